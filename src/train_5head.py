"""`python -m src.train_5head` = `biomass5head train` (kept for the specification's commands)."""
import sys

from biomass5head.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
