"""Cross-validation folds: the six `--cv-strategy` splits, reading `--fold-csv`, writing `folds.csv`.

Every function works on the one-row-per-image frame of `biomass5head.data.tables.load_train` and returns (or takes) one
integer fold per row, in the frame's row order.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from biomass5head.constants import CV_STRATEGIES
from biomass5head.fileio import atomic_path

logger = logging.getLogger(__name__)

ID_COL = "sample_id_prefix"
FOLD_COL = "fold"
TOTAL_COL = "Dry_Total_g"
NUM_BINS = 4  # quartiles of Dry_Total_g
MAX_LISTED = 10  # how many offending ids/values an error message lists before "... (+N more)"

# strategy -> (what groups the rows, what they are stratified by); None = no grouping.
_STRATEGY_PARTS: dict[str, tuple[str | None, str | None]] = {
    "group_month": ("month", "bin"),
    "group_date": ("Sampling_Date", "bin"),
    "group_date_state": ("month", "State"),
    "group_date_state_bin": ("month", "State_bin"),
    "stratified": (None, "bin"),
    "random": (None, None),
}


class FoldError(ValueError):
    """Folds that cannot be made, read or written as asked."""


def _preview(items: Iterable[object], limit: int = MAX_LISTED) -> str:
    """Comma-separated list of `items`, cut after `limit` with a count of the rest."""
    items = [str(x) for x in items]
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def target_bins(df: pd.DataFrame, num_bins: int = NUM_BINS) -> np.ndarray:
    """Quartile bin (0..num_bins-1, fewer when values repeat) of Dry_Total_g for each row."""
    if TOTAL_COL not in df.columns:
        raise FoldError(f"cannot make target bins: column {TOTAL_COL!r} is missing")
    total = pd.to_numeric(df[TOTAL_COL], errors="coerce")
    if total.isna().any():
        bad = df.loc[total.isna(), ID_COL] if ID_COL in df.columns else total.index[total.isna()]
        raise FoldError(f"cannot make target bins: {TOTAL_COL} is missing or not numeric for {_preview(bad)}")
    if total.nunique() < 2:
        return np.zeros(len(df), dtype=np.int64)
    # duplicates="drop" merges quantile edges that coincide (e.g. many equal totals) into fewer bins.
    bins = pd.qcut(total, q=num_bins, labels=False, duplicates="drop")
    return np.asarray(bins, dtype=np.int64)


def _month_column(df: pd.DataFrame) -> pd.Series:
    """The `month` column, or the month parsed from Sampling_Date ('YYYY/M/D') when the frame lacks it."""
    if "month" in df.columns:
        return df["month"]
    if "Sampling_Date" not in df.columns:
        raise FoldError("cannot group by month: neither 'month' nor 'Sampling_Date' is a column")
    return pd.to_datetime(df["Sampling_Date"], format="%Y/%m/%d").dt.month


def _column(df: pd.DataFrame, name: str | None) -> np.ndarray | None:
    """Grouping or stratification labels called `name` (see _STRATEGY_PARTS) as an array."""
    if name is None:
        return None
    if name == "bin":
        return target_bins(df)
    if name == "month":
        return np.asarray(_month_column(df))
    if name == "State_bin":
        state = _column(df, "State")
        return np.asarray([f"{s}|{b}" for s, b in zip(state, target_bins(df), strict=True)])
    if name not in df.columns:
        raise FoldError(f"cannot make folds: column {name!r} is missing")
    return np.asarray(df[name].astype(str))


def _check_request(df: pd.DataFrame, strategy: str, num_folds: int) -> None:
    if strategy not in CV_STRATEGIES:
        raise FoldError(f"unknown CV strategy {strategy!r}; choose one of {', '.join(CV_STRATEGIES)}")
    if int(num_folds) != num_folds or num_folds < 2:
        raise FoldError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if len(df) < num_folds:
        raise FoldError(f"cannot split {len(df)} images into {num_folds} folds (strategy {strategy!r})")


def make_folds(df: pd.DataFrame, strategy: str, num_folds: int, seed: int) -> np.ndarray:
    """Fold (0..num_folds-1) of each row of `df` under a `--cv-strategy`; the same seed gives the same folds.

    Group strategies use StratifiedGroupKFold(shuffle=True, random_state=seed), `stratified` StratifiedKFold,
    `random` a shuffled KFold. Raises FoldError when the data cannot give `num_folds` non-empty folds.
    """
    _check_request(df, strategy, num_folds)
    num_folds = int(num_folds)
    group_name, strat_name = _STRATEGY_PARTS[strategy]
    groups = _column(df, group_name)
    labels = _column(df, strat_name)
    x = np.zeros((len(df), 1))
    if groups is not None:
        n_groups = len(pd.unique(groups))
        if n_groups < num_folds:
            raise FoldError(f"strategy {strategy!r} groups the images by {group_name}: only {n_groups} "
                            f"distinct value(s) for {num_folds} folds; use fewer folds or another strategy")
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        split_args = (x, labels, groups)
    elif labels is not None:
        splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        split_args = (x, labels)
    else:
        splitter = KFold(n_splits=num_folds, shuffle=True, random_state=seed)
        split_args = (x,)

    folds = np.full(len(df), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # A stratum smaller than num_folds is common on small data (e.g. State x bin); sklearn warns once
        # per split call, which would repeat on every run. The split is still valid, so say it at debug.
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        try:
            for k, (_, val_idx) in enumerate(splitter.split(*split_args)):
                folds[val_idx] = k
        except ValueError as err:
            raise FoldError(f"strategy {strategy!r} cannot make {num_folds} folds of {len(df)} images: {err}") from err
    _check_folds_filled(folds, num_folds, f"strategy {strategy!r} with seed {seed}")
    logger.debug("made %d folds with strategy %s, seed %s", num_folds, strategy, seed)
    return folds


def _check_folds_filled(folds: np.ndarray, num_folds: int, where: str) -> None:
    """Raise FoldError when a row has no fold or a fold in range(num_folds) has no images."""
    if (folds < 0).any():
        raise FoldError(f"{where}: {(folds < 0).sum()} image(s) were given no fold")
    counts = np.bincount(folds, minlength=num_folds)
    empty = [k for k in range(num_folds) if counts[k] == 0]
    if empty:
        raise FoldError(f"{where}: fold(s) {_preview(empty)} have no images out of {len(folds)}")


_INT_RE = re.compile(r"^[+-]?\d+(\.0*)?$")


def _parse_fold_values(ids: pd.Series, values: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer folds from the file's text values (-1 where not an integer), the mask of those parsed, and
    `id='value'` for every value that is not an integer ('3' and '3.0' are integers, '3.5', '' and 'a' not)."""
    text = values.astype(str).str.strip().to_numpy()
    ok = np.array([bool(_INT_RE.match(v)) for v in text], dtype=bool)
    parsed = np.array([int(float(v)) if good else -1 for v, good in zip(text, ok, strict=True)], dtype=np.int64)
    bad = [f"{i}={v!r}" for i, v, good in zip(ids, text, ok, strict=True) if not good]
    return parsed, ok, bad


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise FoldError(f"fold file {path} does not exist") from err
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise FoldError(f"fold file {path} cannot be read as CSV: {err}") from err


def read_fold_csv(path: str | os.PathLike, df: pd.DataFrame, num_folds: int) -> np.ndarray:
    """Folds of `df`'s rows from a CSV with `sample_id_prefix, fold` (other columns are ignored).

    The file must list every image of `df` exactly once and nothing else, with integer folds in
    [0, num_folds) and no fold left empty. Raises FoldError naming the file and every problem found.
    """
    path = Path(path)
    if int(num_folds) != num_folds or num_folds < 2:
        raise FoldError(f"num_folds must be an integer >= 2, got {num_folds!r} (fold file {path})")
    table = _read_csv(path)
    missing = [c for c in (ID_COL, FOLD_COL) if c not in table.columns]
    if missing:
        raise FoldError(f"fold file {path} lacks column(s) {', '.join(missing)} (has: {_preview(table.columns)})")
    ids = table[ID_COL].astype(str).str.strip()
    df_ids = df[ID_COL].astype(str)
    problems = []
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        problems.append(f"{len(dup)} duplicated id(s): {_preview(dup)}")
    absent = sorted(set(df_ids) - set(ids))
    if absent:
        problems.append(f"{len(absent)} training image(s) not in the file: {_preview(absent)}")
    extra = sorted(set(ids) - set(df_ids))
    if extra:
        problems.append(f"{len(extra)} id(s) not among the training images: {_preview(extra)}")
    parsed, ok, not_int = _parse_fold_values(ids, table[FOLD_COL])
    if not_int:
        problems.append(f"{len(not_int)} non-integer fold value(s): {_preview(not_int)}")
    in_range = (parsed >= 0) & (parsed < num_folds)
    out_of_range = [f"{i}={v}" for i, v, bad in zip(ids, parsed, ok & ~in_range, strict=True) if bad]
    if out_of_range:
        problems.append(f"{len(out_of_range)} fold value(s) outside [0, {num_folds}): {_preview(out_of_range)}")
    if not problems:
        empty = [k for k in range(num_folds) if not (parsed == k).any()]
        if empty:
            problems.append(f"fold(s) {_preview(empty)} have no images (expected folds 0..{num_folds - 1})")
    if problems:
        raise FoldError(f"fold file {path}:\n  " + "\n  ".join(problems))
    by_id = pd.Series(parsed, index=ids)
    return by_id.loc[df_ids].to_numpy(dtype=np.int64)


def write_folds(path: str | os.PathLike, df: pd.DataFrame, folds: np.ndarray) -> None:
    """Write `sample_id_prefix,fold` in `df`'s row order, atomically."""
    path = Path(path)
    folds = np.asarray(folds)
    if folds.shape != (len(df),):
        raise FoldError(f"cannot write {path}: {folds.shape} folds for {len(df)} images")
    out = pd.DataFrame({ID_COL: df[ID_COL].astype(str).to_numpy(), FOLD_COL: folds.astype(np.int64)})
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)


def fold_summary(df: pd.DataFrame, folds: np.ndarray) -> str:
    """A short per-fold table for logs: images, mean Dry_Total_g, months and image counts per State."""
    folds = np.asarray(folds)
    lines = [f"{'fold':>4} {'images':>6} {'mean Total':>10}  {'months':<20} states"]
    month = _month_column(df) if ("month" in df.columns or "Sampling_Date" in df.columns) else None
    for k in sorted(set(folds.tolist())):
        part = df.loc[folds == k]
        mean_total = f"{part[TOTAL_COL].mean():10.2f}" if TOTAL_COL in df.columns else f"{'-':>10}"
        months = ",".join(str(m) for m in sorted(set(month[folds == k]))) if month is not None else "-"
        states = " ".join(f"{s}:{n}" for s, n in part["State"].value_counts().sort_index().items()) \
            if "State" in df.columns else "-"
        lines.append(f"{k:>4} {len(part):>6} {mean_total}  {months:<20} {states}")
    return "\n".join(lines)


def inner_split(df: pd.DataFrame, strategy: str, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows of a training fold (`df`) held out to select on (`--select-on inner`): part 0 of
    `inner_parts`, so about `frac` of the images (exactly 1/k of them up to group sizes)."""
    return inner_parts(df, strategy, frac, seed) == 0


def inner_parts(df: pd.DataFrame, strategy: str, frac: float, seed: int) -> np.ndarray:
    """The part (0 .. k-1) of each row of a training fold (`df`) in its inner k-fold split.

    The rows are split like the outer `--cv-strategy` splits them: the groups (months or dates) of a group
    strategy stay whole, stratified as the outer split is, into k = round(1 / frac) parts. Part 0 is the inner
    split that `--select-on inner` holds out; all k serve `--ridge-select cv`. When the training fold has fewer
    groups than k, a group strategy makes one part per group if it has at least two, else falls back to a
    stratified split of images (logged).
    """
    if not 0.0 < frac < 1.0:
        raise FoldError(f"--inner-frac must be in (0, 1), got {frac}")
    k = max(2, int(round(1.0 / frac)))
    if len(df) < k:
        raise FoldError(f"cannot hold out an inner split of {len(df)} training images (k = {k} parts)")
    group_name, strat_name = _STRATEGY_PARTS[strategy]
    groups, labels = _column(df, group_name), _column(df, strat_name)
    x = np.zeros((len(df), 1))
    if groups is not None and len(pd.unique(groups)) < 2:
        logger.info("inner split: the training fold has one %s only; splitting its images stratified instead",
                    group_name)
        groups, labels = None, labels if labels is not None else target_bins(df)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        if groups is not None:
            k = min(k, len(pd.unique(groups)))
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            splits = splitter.split(x, labels if labels is not None else np.zeros(len(df)), groups)
        elif labels is not None and np.bincount(pd.factorize(labels)[0]).min() >= 2:
            splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, labels)
        else:
            splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(x)
        parts = np.full(len(df), -1)
        for part, (_, held) in enumerate(splits):
            parts[held] = part
    return parts


def scored_parts(parts: np.ndarray) -> list[int]:
    """The inner parts (of `inner_parts`) that a cross-validation can score: those with at least 2 images (R² needs
    two; a grouped split may leave a part empty when the training fold has few groups). Raises FoldError when none
    has."""
    kept = [int(j) for j, n in zip(*np.unique(parts[parts >= 0], return_counts=True), strict=True) if n >= 2]
    if not kept:
        raise FoldError(f"no inner part of the {len(parts)} training images has 2 images to score: lower "
                        "--inner-frac, or use --ridge-select holdout")
    return kept
