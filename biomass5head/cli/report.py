"""A short report of a finished, evaluated run: the OOF metric table of the 5-head model beside a ridge
regression on the same frozen features, with links to the plots and the submission.

    python -m src.train_5head ... --freeze-backbone --output-dir RUN
    python -m src.eval_5head_oof --model-dir RUN
    python -m src.report --model-dir RUN

Writes RUN/report.md (and RUN/ridge_oof_metrics.json) and prints the tables. The ridge needs the run's cached
frozen features (computed here when missing), so it is offered for runs trained with --freeze-backbone.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from biomass5head.cli.common import prog, run_command

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("python -m src.report"), description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="an evaluated run folder")
    return p


def report_command(args: argparse.Namespace) -> None:
    from biomass5head.infer.report import build_report  # here, so that --help answers without loading torch

    print(build_report(Path(args.model_dir)), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, report_command, logger)
