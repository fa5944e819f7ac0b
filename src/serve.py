"""`python -m src.serve` = `biomass5head serve`: the local web page and JSON API over a finished run."""
import sys

from biomass5head.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
