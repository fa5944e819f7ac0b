"""`python -m src.export` = `biomass5head export`: a finished run as one ONNX graph."""
import sys

from biomass5head.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
