"""`python -m biomass5head COMMAND ...`: the same as the installed `biomass5head` command."""
import sys

from biomass5head.cli.main import main

sys.exit(main())
