"""Derive the distributions behind the synthetic data set from the real training metadata, once.

Reads the real wide-form fold file (one row per image: metadata, the five targets, `fold`) and writes
`biomass5head/synthetic/params.py`: plain Python numbers and dicts, so the project never needs the real file at run
or test time. Run from the project root:

    python scripts/derive_synthetic_params.py ../shared/data/trainfold.csv

The model is deliberately simple:
- State ~ real frequencies; per State, Species and Sampling_Date ~ their real frequencies (independently).
- Pre_GSHH_NDVI ~ Normal(state mean, state std) clipped to the state's real range;
  Height_Ave_cm ~ LogNormal(state mean/std of log height) clipped to the state's real range.
- Each of Green, Dead, Clover is zero with a probability per (State, species group), shrunk towards the
  State's rate (a Beta prior worth `PRIOR_WEIGHT` images) because some cells hold only a few images.
- Non-zero values: log1p(grams) = intercept(State, species group) + slope_h * (log height - state mean)
  + slope_ndvi * (NDVI - state mean) + residual, residuals ~ MultivariateNormal(0, cov) over the three
  components (pairwise-complete covariance of the non-zero rows, projected to positive semi-definite).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pprint
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from biomass5head.constants import STATES, species_group  # noqa: E402

COMPONENTS = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g")
PRIOR_WEIGHT = 2.0  # pseudo-images pulling a (State, group) zero rate towards the State's rate
MIN_CELL = 3  # fewer non-zero images than this: the intercept falls back to the State's, then the global one


def _r(x, nd: int = 5):
    """Round floats (also inside lists/dicts) so the written module stays readable."""
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    return round(float(x), nd)


def metadata_params(df: pd.DataFrame) -> dict:
    """State / Species / date frequencies and the NDVI and height distributions per State."""
    out = {"STATE_COUNTS": {s: int((df.State == s).sum()) for s in STATES}, "SPECIES_COUNTS": {}, "DATE_COUNTS": {},
           "NDVI": {}, "HEIGHT": {}}
    for s in STATES:
        d = df[df.State == s]
        out["SPECIES_COUNTS"][s] = {k: int(v) for k, v in d.Species.value_counts().sort_index().items()}
        dates = sorted(d.Sampling_Date.value_counts().items(), key=lambda kv: pd.Timestamp(kv[0]))
        out["DATE_COUNTS"][s] = [(k, int(v)) for k, v in dates]
        ndvi, logh = d.Pre_GSHH_NDVI, np.log(d.Height_Ave_cm)
        out["NDVI"][s] = _r({"mean": ndvi.mean(), "std": ndvi.std(), "min": ndvi.min(), "max": ndvi.max()})
        out["HEIGHT"][s] = _r({"log_mean": logh.mean(), "log_std": logh.std(),
                               "min": d.Height_Ave_cm.min(), "max": d.Height_Ave_cm.max()})
    return out


def zero_probs(df: pd.DataFrame) -> dict:
    """P(component == 0) per State and species group, shrunk towards the State's rate."""
    out: dict = {}
    for s in STATES:
        d = df[df.State == s]
        state_rate = (d[list(COMPONENTS)] == 0).mean()
        out[s] = {}
        for g, dg in d.groupby("group"):
            zeros = (dg[list(COMPONENTS)] == 0).sum()
            p = (zeros + PRIOR_WEIGHT * state_rate) / (len(dg) + PRIOR_WEIGHT)
            out[s][g] = _r(p.tolist(), 4)
    return out


def _covariates(df: pd.DataFrame) -> np.ndarray:
    """(N, 2) log height and NDVI, each centred on its State's mean."""
    logh = np.log(df.Height_Ave_cm)
    return np.stack([logh - logh.groupby(df.State).transform("mean"),
                     df.Pre_GSHH_NDVI - df.Pre_GSHH_NDVI.groupby(df.State).transform("mean")], axis=1)


def log_model(df: pd.DataFrame) -> dict:
    """Intercepts, slopes and residual covariance of log1p(component) on the non-zero rows."""
    x = _covariates(df)
    cells = sorted(set(zip(df.State, df.group, strict=True)))
    slopes, intercepts, resid = [], {s: {} for s in STATES}, np.full((len(df), 3), np.nan)
    for k, name in enumerate(COMPONENTS):
        nz = (df[name] > 0).to_numpy()
        y = np.log1p(df[name].to_numpy())
        cell_of = np.array([cells.index(c) for c in zip(df.State, df.group, strict=True)])
        design = np.concatenate([np.eye(len(cells))[cell_of], x], axis=1)[nz]
        keep = design[:, :len(cells)].sum(0) > 0  # drop cells without a single non-zero row
        coef = np.linalg.lstsq(design[:, np.r_[keep, True, True]], y[nz], rcond=None)[0]
        slope = coef[-2:]
        adj = y - x @ slope  # log value with the covariates' effect removed
        for s, g in cells:
            for mask in ((df.State == s) & (df.group == g), df.State == s, df.State.notna()):
                m = mask.to_numpy() & nz
                if m.sum() >= MIN_CELL:
                    break
            intercepts[s].setdefault(g, [0.0, 0.0, 0.0])[k] = round(float(adj[m].mean()), 5)
            cm = ((df.State == s) & (df.group == g)).to_numpy() & nz
            resid[cm, k] = adj[cm] - intercepts[s][g][k]
        slopes.append(slope)
    cov = pd.DataFrame(resid).cov(min_periods=MIN_CELL).to_numpy()
    w, v = np.linalg.eigh(cov)
    cov = (v * np.clip(w, 1e-6, None)) @ v.T
    slopes = np.array(slopes)
    return {"LOG_INTERCEPT": intercepts, "LOG_SLOPE_HEIGHT": _r(slopes[:, 0].tolist()),
            "LOG_SLOPE_NDVI": _r(slopes[:, 1].tolist()), "LOG_RESID_COV": _r(cov.tolist()),
            "NONZERO_MIN": _r([df[c][df[c] > 0].min() for c in COMPONENTS], 4),
            "NONZERO_MAX": _r([df[c].max() for c in COMPONENTS], 4)}


def real_summary(df: pd.DataFrame) -> dict:
    """Summary statistics of the real targets, kept for comparison with synthetic draws (tests, reports)."""
    cols = [*COMPONENTS, "GDM_g", "Dry_Total_g"]
    return {"mean": _r(df[cols].mean().to_dict(), 4), "zero_frac": _r((df[cols] == 0).mean().to_dict(), 4),
            "corr_green_total": round(float(df.Dry_Green_g.corr(df.Dry_Total_g)), 4),
            "corr_green_height": round(float(df.Dry_Green_g.corr(df.Height_Ave_cm)), 4)}


def render_module(params: dict, source: Path, digest: str, n: int) -> str:
    """Text of biomass5head/synthetic/params.py."""
    head = [
        '"""Distributions of the real CSIRO Image2Biomass training set that drive biomass5head.synthetic '
        '(generated file)."""',
        f"# Generated by `python scripts/derive_synthetic_params.py {os.path.relpath(source, ROOT)}` from the real",
        f"# wide-form fold file ({n} images, sha256 {digest[:16]}...). Do not edit by hand: rerun the script.",
        "# The model these numbers belong to is in that script's docstring; components are (Green, Dead, Clover).",
        "from __future__ import annotations",
        "",
        f"COMPONENTS = {COMPONENTS!r}",
        f"N_REAL = {n}",
    ]
    body = [f"{k} = {pprint.pformat(v, width=116, sort_dicts=False, compact=True)}" for k, v in params.items()]
    return "\n".join(head + [""] + body) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Read the real fold file and write biomass5head/synthetic/params.py."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default=str(ROOT.parent / "shared" / "data" / "trainfold.csv"))
    p.add_argument("--out", default=str(ROOT / "biomass5head" / "synthetic" / "params.py"))
    args = p.parse_args(argv)
    source = Path(args.csv)
    raw = source.read_bytes()
    df = pd.read_csv(source)
    df["group"] = df.Species.map(species_group)
    params = {**metadata_params(df), "ZERO_PROB": zero_probs(df), **log_model(df), "REAL_SUMMARY": real_summary(df)}
    Path(args.out).write_text(render_module(params, source, hashlib.sha256(raw).hexdigest(), len(df)))
    print(f"wrote {args.out} from {source} ({len(df)} images)")


if __name__ == "__main__":
    main()
