"""Synthetic CSIRO Image2Biomass data in the competition's layout: metadata, targets, folds and photos.

`generate(out_dir)` writes `train.csv` (long, five rows per image), `test.csv`, `train/*.jpg`, `test/*.jpg` and
`trainfold.csv` (`sample_id_prefix,fold`). Metadata and targets are drawn from distributions fitted to the
real training set (`synthetic/params.py`, see `scripts/derive_synthetic_params.py`); the photos are drawn
by `synthetic/render.py` so that they show the targets (green, dead and clover cover, blade length).
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass5head.constants import STATES, species_group
from biomass5head.synthetic import params as P
from biomass5head.synthetic.realism import jpeg_quality, noisy_labels
from biomass5head.synthetic.render import render_photo

# The real train.csv lists an image's five rows in this (alphabetical) order.
FILE_TARGET_ORDER = ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g", "Dry_Total_g", "GDM_g")
META_COLUMNS = ["Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm"]
NUM_FOLDS = 5
JPEG_QUALITY = 90
DIFFICULTIES = ("easy", "realistic")


def _covers_groups(states: np.ndarray, dates: np.ndarray) -> bool:
    """True when a draw holds every State, at least 5 dates and at least 5 months (so 5-fold splits work)."""
    months = {d.split("/")[1] for d in dates}
    return set(states) == set(STATES) and len(set(dates)) >= NUM_FOLDS and len(months) >= NUM_FOLDS


def sample_state_dates(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw (State, Sampling_Date) pairs by systematic sampling of the real (State, date) frequencies.

    Systematic sampling gives every State and date its real share up to one image, so even small sets hold
    all four States; for n >= 20 the draw is repeated until it also holds >= 5 dates and >= 5 months.
    """
    for _ in range(100):
        cells = []
        for s in rng.permutation(STATES):
            cells += [(s, d, c) for d, c in (P.DATE_COUNTS[s][i] for i in rng.permutation(len(P.DATE_COUNTS[s])))]
        cum = np.cumsum([c for *_, c in cells]) / sum(c for *_, c in cells)
        idx = np.minimum(np.searchsorted(cum, (rng.random() + np.arange(n)) / n, side="right"), len(cells) - 1)
        idx = rng.permutation(idx)
        states, dates = np.array([cells[i][0] for i in idx]), np.array([cells[i][1] for i in idx])
        if n < 20 or _covers_groups(states, dates):
            return states, dates
    raise RuntimeError(f"could not draw {n} images covering all States, 5 dates and 5 months")


def sample_targets(meta: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) Green, Dead, Clover grams: zero-inflated log-normal given State, species group, height, NDVI."""
    n = len(meta)
    groups = meta.Species.map(species_group)
    p_zero = np.array([P.ZERO_PROB[s].get(g, [0.0, 0.0, 0.0]) for s, g in zip(meta.State, groups, strict=True)])
    zero = rng.random((n, 3)) < p_zero
    # Green and Clover never vanish together in the real data (GDM > 0): keep the likelier one.
    both = zero[:, 0] & zero[:, 2]
    keep_clover = p_zero[:, 2] < p_zero[:, 0]
    zero[both & keep_clover, 2] = False
    zero[both & ~keep_clover, 0] = False
    fallback = np.mean([v for s in STATES for v in P.LOG_INTERCEPT[s].values()], axis=0)
    icpt = np.array([P.LOG_INTERCEPT[s].get(g, fallback) for s, g in zip(meta.State, groups, strict=True)])
    logh = np.log(meta.Height_Ave_cm.to_numpy()) - np.array([P.HEIGHT[s]["log_mean"] for s in meta.State])
    ndvi = meta.Pre_GSHH_NDVI.to_numpy() - np.array([P.NDVI[s]["mean"] for s in meta.State])
    mean = icpt + logh[:, None] * np.array(P.LOG_SLOPE_HEIGHT) + ndvi[:, None] * np.array(P.LOG_SLOPE_NDVI)
    logs = mean + rng.multivariate_normal(np.zeros(3), np.array(P.LOG_RESID_COV), size=n, method="eigh")
    grams = np.clip(np.expm1(logs), P.NONZERO_MIN, P.NONZERO_MAX)
    return np.where(zero, 0.0, np.round(grams, 4))


def sample_records(n: int, seed: int = 0) -> pd.DataFrame:
    """n synthetic images' metadata and five targets (one row per image, wide), deterministic for a seed."""
    rng = np.random.default_rng([seed, 1])
    states, dates = sample_state_dates(n, rng)
    meta = pd.DataFrame({"Sampling_Date": dates, "State": states})
    meta["Species"] = [rng.choice(list(P.SPECIES_COUNTS[s]), p=_freq(P.SPECIES_COUNTS[s])) for s in states]
    nd = pd.DataFrame([P.NDVI[s] for s in states])
    meta["Pre_GSHH_NDVI"] = np.round(np.clip(rng.normal(nd["mean"], nd["std"]), nd["min"], nd["max"]), 2)
    ht = pd.DataFrame([P.HEIGHT[s] for s in states])
    height = np.clip(np.exp(rng.normal(ht["log_mean"], ht["log_std"])), ht["min"], ht["max"])
    meta["Height_Ave_cm"] = np.round(np.round(height * 6) / 6, 4)  # real heights are means of a few readings
    g, d, c = sample_targets(meta, rng).T
    meta["Dry_Green_g"], meta["Dry_Dead_g"], meta["Dry_Clover_g"] = g, d, c
    meta["GDM_g"] = np.round(g + c, 4)
    meta["Dry_Total_g"] = np.round(g + d + c, 4)
    meta.insert(0, "sample_id_prefix", _unique_ids(n, np.random.default_rng([seed, 2])))
    return meta


def _freq(counts: dict) -> np.ndarray:
    v = np.array(list(counts.values()), dtype=float)
    return v / v.sum()


def _unique_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct ids `ID` + 10 digits."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        for v in rng.integers(1_000_000_000, 10_000_000_000, size=n - len(ids)).tolist():
            if v not in seen:
                seen.add(v)
                ids.append(v)
    return [f"ID{v:010d}" for v in ids]


def assign_folds(dates: pd.Series, seed: int = 0, num_folds: int = NUM_FOLDS) -> np.ndarray:
    """Fold per image, grouped by Sampling_Date like the real fold file: largest dates first, to the emptiest fold."""
    counts = dates.value_counts()
    order = np.random.default_rng([seed, 3]).permutation(len(counts))
    groups = sorted(zip(counts.index[order], counts.to_numpy()[order], strict=True), key=lambda kv: -kv[1])
    sizes, fold_of = np.zeros(num_folds, int), {}
    for date, count in groups:
        k = int(np.argmin(sizes))
        fold_of[date], sizes[k] = k, sizes[k] + count
    return dates.map(fold_of).to_numpy()


def to_long(wide: pd.DataFrame, split: str) -> pd.DataFrame:
    """Competition long form: five rows per image in FILE_TARGET_ORDER (test: no metadata, no target)."""
    rows = wide.loc[wide.index.repeat(len(FILE_TARGET_ORDER))].reset_index(drop=True)
    rows["target_name"] = list(FILE_TARGET_ORDER) * len(wide)
    rows["sample_id"] = rows.sample_id_prefix + "__" + rows.target_name
    rows["image_path"] = f"{split}/" + rows.sample_id_prefix + ".jpg"
    if split == "test":
        return rows[["sample_id", "image_path", "target_name"]]
    rows["target"] = [r[t] for r, t in zip(rows.to_dict("records"), rows.target_name, strict=True)]
    return rows[["sample_id", "image_path", *META_COLUMNS, "target_name", "target"]]


def _render_job(job: tuple) -> None:
    """Worker: draw one photo and write it as a JPEG (runs in a child process)."""
    import cv2

    path, record, size, seed, realistic = job
    cv2.setNumThreads(1)
    realism = np.random.default_rng([*seed, 1]) if realistic else None
    rgb = render_photo(record, size, np.random.default_rng(seed), realism)
    quality = jpeg_quality(realism) if realism is not None else JPEG_QUALITY
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())


def measured(records: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The records as clip-and-weigh would report them: components with measurement error, sums recomputed."""
    out = records.copy()
    g, d, c = noisy_labels(out.Dry_Green_g, out.Dry_Dead_g, out.Dry_Clover_g, np.random.default_rng([seed, 5]))
    out["Dry_Green_g"], out["Dry_Dead_g"], out["Dry_Clover_g"] = g, d, c
    out["GDM_g"] = np.round(g + c, 4)
    out["Dry_Total_g"] = np.round(g + d + c, 4)
    return out


def generate(out_dir, n_train: int = 357, n_test: int = 20, size: tuple[int, int] = (2000, 1000), seed: int = 0,
             *, difficulty: str = "easy", workers: int | None = None,
             progress: Callable[[int], Any] | None = None) -> None:
    """Write a synthetic data set in the competition's layout into out_dir (created if missing).

    difficulty: "easy" (clean photos, exact labels) or "realistic" (label noise, shadows, exposure, blur, camera
    height, weeds, litter and bare patches: `synthetic/realism.py`). Metadata, true targets and folds are the same
    for both at one seed; realistic labels are the true ones with measurement error.

    size is (W, H) of the whole photo (two W/2 x H stereo views side by side). workers: processes that draw
    the photos (default: up to 4 CPUs). progress: called with the number of photos, returns a bar with
    `update(n)` and `close()` (e.g. `lambda total: tqdm(total=total)`). Deterministic for a seed: the same
    arguments give the same files, whatever the number of workers.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if n_train < NUM_FOLDS or n_test < 0:
        raise ValueError(f"need n_train >= {NUM_FOLDS} (one image per fold) and n_test >= 0, got {n_train}, {n_test}")
    out = Path(out_dir)
    for sub in ("train", "test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records = sample_records(n_train + n_test, seed)
    train = records.iloc[:n_train].sort_values("sample_id_prefix").reset_index(drop=True)
    test = records.iloc[n_train:].sort_values("sample_id_prefix").reset_index(drop=True)
    realistic = difficulty == "realistic"
    to_long(measured(train, seed) if realistic else train, "train").to_csv(out / "train.csv", index=False)
    to_long(test, "test").to_csv(out / "test.csv", index=False)
    folds = pd.DataFrame({"sample_id_prefix": train.sample_id_prefix, "fold": assign_folds(train.Sampling_Date, seed)})
    folds.to_csv(out / "trainfold.csv", index=False)
    # Each photo's seed follows its split and position, so a photo never depends on the worker count.
    jobs = [(str(out / split / f"{r['sample_id_prefix']}.jpg"), r, tuple(size), [seed, 4, k, i], realistic)
            for k, (split, frame) in enumerate((("train", train), ("test", test)))
            for i, r in enumerate(frame.to_dict("records"))]
    _run_jobs(jobs, workers or min(4, os.cpu_count() or 1), progress)


def _run_jobs(jobs: list[tuple], workers: int, progress) -> None:
    """Draw all photos, in worker processes when workers > 1, updating the progress bar per photo."""
    bar = progress(len(jobs)) if progress else None
    try:
        if workers <= 1:
            results = map(_render_job, jobs)
        else:
            # spawn, not fork: forking a process whose OpenCV / OpenMP thread pools are already running can
            # deadlock the child (seen under pytest after torch was imported).
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            results = pool.map(_render_job, jobs, chunksize=2)
        for _ in results:
            if bar is not None:
                bar.update(1)
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
