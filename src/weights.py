"""`python -m src.weights` = `biomass5head weights` (kept for the specification's commands)."""
import sys

from biomass5head.cli.weights import main

if __name__ == "__main__":
    sys.exit(main())
