"""`python -m src.eval_5head_oof` = `biomass5head eval` (kept for the specification's commands)."""
import sys

from biomass5head.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
