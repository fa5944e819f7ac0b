"""`--refit`: after `--select-on inner` has chosen a fold's epoch, train the fold again on all its training images.

Selecting on an inner split costs the model that split's images: the selection pass fits on about 80 % of the
training folds (with the default `--inner-frac 0.2`), while the ridge probe it is compared with refits on all of
them. On the realistic synthetic sets a ridge fitted on 80 % instead of 100 % of the training folds loses 0.005-0.04
weighted R² (docs/MODEL_QUALITY.md). The refit pass starts again from the same initial weights and seed, on every
training image of the fold, under the same schedule (the same number of epochs planned, so the learning rate follows
the selection pass's curve), and stops after the selected epoch; the fold's checkpoint holds its last weights. The
epoch count is the only thing carried over, and it was chosen on images that were not scored, so the OOF score stays
honest. The ridge base (`--ridge-base`) keeps the rows and alpha the selection pass chose (on the inner split, or by
the same inner cross-validation with `--ridge-select cv`; train/ridge_fit.py) and is refitted on every image.

The refit pass logs to `log_fold{k}_refit.csv`; its "val" columns score the inner split, which is now part of the
training images (in-sample: a check that training went as planned, not a selection). It resumes from its own state
file, after the selection pass's final state.
"""
from __future__ import annotations

import logging

import pandas as pd

from biomass5head.train.resume import Progress
from biomass5head.train.trainer import FoldTrainer

logger = logging.getLogger(__name__)


def refit_state_name(fold: int) -> str:
    return f"5head_last_fold{fold}_refit.pth"


class RefitTrainer(FoldTrainer):
    """A fold trained on `fit_df` + `select_df` until `epochs` epochs are done; every epoch's weights replace the
    last, so the checkpoint ends with the final epoch's."""

    def __init__(self, cfg, fold: int, fit_df: pd.DataFrame, select_df: pd.DataFrame, epochs: int, *args, **kwargs):
        super().__init__(cfg, fold, pd.concat([fit_df, select_df]), select_df, *args, **kwargs)
        self.ridge_df = fit_df.reset_index(drop=True)  # the ridge base: rows and alpha chosen as in selection
        self.stop_epoch = int(epochs)
        self.last_path = self.out_dir / refit_state_name(fold)
        self.log_path = self.out_dir / f"log_fold{fold}_refit.csv"

    def improved(self, score: float, p: Progress) -> bool:
        return True

    def run(self) -> dict:
        logger.info("fold %d: refitting on all %d training images for %d epochs (--refit; the epoch count was chosen "
                    "on the inner split)", self.fold, len(self.train_df), self.stop_epoch)
        return super().run()
