"""`python -m src.make_synthetic` = `biomass5head synthetic` (kept for the specification's commands)."""
import sys

from biomass5head.cli.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
