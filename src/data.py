"""`python -m src.data` = `biomass5head check` (kept for the specification's commands)."""
import sys

from biomass5head.cli.check import main

if __name__ == "__main__":
    sys.exit(main())
