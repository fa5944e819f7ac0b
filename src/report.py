"""`python -m src.report` = `biomass5head report` (kept for the specification's commands)."""
import sys

from biomass5head.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
