"""`python -m src.predict` = `biomass5head predict` (kept for the specification's commands)."""
import sys

from biomass5head.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
