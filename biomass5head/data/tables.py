"""Reading and validating the competition's `train.csv` (long -> one row per image) and `test.csv`.

`python -m src.data DIR` (`biomass5head check DIR`, in `cli/check.py`) validates a data folder with these.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from datetime import datetime
from pathlib import Path

import pandas as pd

from biomass5head.constants import (
    AUX_HEADS,
    MONTHS,
    SPECIES_TO_GROUP,
    STATES,
    TARGETS,
    species_group,
)

log = logging.getLogger(__name__)

TRAIN_COLUMNS: tuple[str, ...] = (
    "sample_id", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm",
    "target_name", "target",
)
TEST_COLUMNS: tuple[str, ...] = ("sample_id", "image_path", "target_name")
META_COLUMNS: tuple[str, ...] = ("image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm")
# Plausibility: the identities hold to this (absolute grams or fraction of the larger side), and no target of a
# quadrat photo comes near MAX_PLAUSIBLE_G (the real maximum Total is 186 g).
IDENTITY_TOLERANCE_G, IDENTITY_TOLERANCE_REL = 1.0, 0.02
MAX_PLAUSIBLE_G = 2000.0
DATE_FORMATS = ("%Y/%m/%d", "%Y-%m-%d")  # 2015/9/4 as the competition writes it, or ISO; zero padding optional


class DataError(ValueError):
    """A train.csv / test.csv that cannot be used; the message lists every problem found."""


def _raise_if(problems: list[str], path: Path) -> None:
    """Raise one DataError listing all problems (if any) found in the file at `path`."""
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} problem(s) in {path}:\n{listed}")


def _lines(lines) -> str:
    """'line 7' or 'lines 2, 3, 4' for messages (long lists are shortened)."""
    lines = [int(x) for x in lines]
    if len(lines) == 1:
        return f"line {lines[0]}"
    shown = ", ".join(str(x) for x in lines[:6])
    return f"lines {shown}" + (f", ... ({len(lines)} rows)" if len(lines) > 6 else "")


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as stripped strings plus `_line` (1-based, header = line 1); bad columns or no rows -> DataError."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    extra = [c for c in df.columns if c not in columns]
    problems = []
    if missing:
        problems.append(f"{path.name} line 1 (header): missing column(s) {missing}")
        for sep, name in ((";", "semicolons"), ("\t", "tabs")):
            if len(df.columns) == 1 and sep in df.columns[0]:
                problems.append(f"{path.name} looks separated by {name}: save it with commas (the competition's "
                                "format)")
    if extra:
        problems.append(f"{path.name} line 1 (header): unexpected column(s) {extra}; expected exactly {list(columns)}")
    _raise_if(problems, path)
    df = df[list(columns)].fillna("").astype(object)
    df = df.apply(lambda s: s.str.strip())
    df.insert(0, "_line", range(2, len(df) + 2))
    df = df[(df[list(columns)] != "").any(axis=1)].reset_index(drop=True)  # blank lines
    if df.empty:
        raise DataError(f"{path} has a header but no data rows")
    return df


def _check_ids(df: pd.DataFrame, fname: str, problems: list[str]) -> pd.Series:
    """Check target names, the `<image id>__<target_name>` form and uniqueness of sample_id; return image ids."""
    prefixes = []
    for line, sid, tname in zip(df["_line"], df["sample_id"], df["target_name"], strict=True):
        if tname not in TARGETS:
            problems.append(f"{fname} line {line} ({sid}): unknown target_name {tname!r}; expected one of {TARGETS}")
        suffix = f"__{tname}"
        if tname and sid.endswith(suffix) and len(sid) > len(suffix):
            prefixes.append(sid[: -len(suffix)])
            continue
        problems.append(f"{fname} line {line}: sample_id {sid!r} does not match '<image id>__<target_name>' "
                        f"with target_name {tname!r}")
        prefixes.append(sid.rpartition("__")[0] or None)  # best guess, so later checks do not cascade
    for sid, lines in df.loc[df["sample_id"].duplicated(keep=False)].groupby("sample_id")["_line"]:
        problems.append(f"{fname} {_lines(lines)}: duplicate sample_id {sid!r}")
    return pd.Series(prefixes, index=df.index, dtype=object)


def _inside(base: str, path: str) -> bool:
    try:
        return os.path.commonpath([base, path]) == base
    except ValueError:  # different drives on Windows
        return False


def _check_image_paths(df: pd.DataFrame, base: Path, fname: str, problems: list[str]) -> pd.Series:
    """Check each distinct image_path lies inside BASE and is a file; return every row's absolute photo path.

    Containment is checked on the normalised path, not the symlink-resolved one, so an image folder that is a
    symlink to another disk is fine, while `../x.jpg` or an absolute path elsewhere is not.
    """
    base_abs = os.path.abspath(base)
    abs_paths = {}
    for rel, lines in df.groupby("image_path", sort=False)["_line"]:
        full = os.path.normpath(os.path.join(base_abs, rel))
        abs_paths[rel] = full
        where = f"{fname} {_lines(lines)}"
        if not rel:
            problems.append(f"{where}: empty image_path")
        elif not _inside(base_abs, full):
            problems.append(f"{where}: image_path {rel!r} resolves to {full}, outside the base path {base_abs}")
        elif not os.path.isfile(full):
            problems.append(f"{where}: image_path {rel!r} does not exist ({full})")
    return df["image_path"].map(abs_paths)


def _number(raw: str, name: str, non_negative: bool) -> tuple[float, str | None]:
    """Parse one numeric cell; return (value, None) or (NaN, what is wrong with it)."""
    try:
        value = float(raw)
    except ValueError:
        return math.nan, (f"{name} {raw!r} is not a number" if raw else f"{name} is empty")
    if math.isnan(value):
        return math.nan, f"{name} {raw!r} is NaN"
    if math.isinf(value):
        return math.nan, f"{name} {raw!r} is infinite"
    if non_negative and value < 0:
        return math.nan, f"{name} {raw!r} is negative"
    return value, None


def _parse_values(df: pd.DataFrame, fname: str, problems: list[str]) -> pd.DataFrame:
    """Parse target, NDVI, height and date of each row; return them (NaN / -1 where bad, each problem recorded)."""
    specs = (("target", True), ("Pre_GSHH_NDVI", False), ("Height_Ave_cm", True))
    out: dict[str, list] = {name: [] for name, _ in specs}
    out["month"] = []
    for rec in df.to_dict("records"):
        where = f"{fname} line {rec['_line']} ({rec['sample_id']})"
        for name, non_negative in specs:
            value, problem = _number(rec[name], name, non_negative)
            out[name].append(value)
            if problem:
                problems.append(f"{where}: {problem}")
        month = _month(rec["Sampling_Date"])
        out["month"].append(month)
        if month < 0:
            problems.append(f"{where}: Sampling_Date {rec['Sampling_Date']!r} is not a date written YYYY/M/D "
                            "(or YYYY-MM-DD)")
    return pd.DataFrame(out, index=df.index)


def _month(text: str) -> int:
    """The month of a date written as the competition does (2015/9/4) or ISO (2015-09-04); -1 for neither."""
    for fmt in DATE_FORMATS:
        with contextlib.suppress(ValueError):
            return datetime.strptime(text, fmt).month
    return -1


def _check_per_image(df: pd.DataFrame, values: pd.DataFrame, fname: str, problems: list[str]) -> None:
    """Each image needs the five targets exactly once and the same metadata on all of its rows."""
    keyed = df.assign(**{f"_{c}": values[c] for c in ("Pre_GSHH_NDVI", "Height_Ave_cm")})
    for prefix, group in keyed.groupby("_prefix", sort=True):
        where = f"{fname} image {prefix} ({_lines(group['_line'])})"
        names = group["target_name"]
        missing = [t for t in TARGETS if t not in set(names)]
        repeated = sorted(set(names[names.duplicated()]))
        if missing:
            problems.append(f"{where}: missing target(s) {missing}")
        if repeated:
            problems.append(f"{where}: target(s) given more than once {repeated}")
        for col in META_COLUMNS:
            # numbers compare by value ("0.6" == "0.60"); unparseable ones are reported already
            key = f"_{col}" if f"_{col}" in group else col
            if group[key].nunique(dropna=True) > 1:
                problems.append(f"{where}: {col} disagrees between rows of the same image: "
                                f"{list(dict.fromkeys(group[col]))}")


def _warn_labels(wide: pd.DataFrame, fname: str) -> None:
    """Log unknown States / Species and months outside the competition's ten (their labels become ignored)."""
    checks = (
        ("State", ~wide["State"].isin(STATES), f"its state label is ignored (known: {STATES})"),
        ("Species", ~wide["Species"].isin(list(SPECIES_TO_GROUP)), "grouped as species 'Other'"),
        ("month", ~wide["month"].isin(MONTHS), f"its month label is ignored (competition months: {MONTHS})"),
    )
    for col, mask, consequence in checks:
        for value, ids in wide.loc[mask].groupby(col)["sample_id_prefix"]:
            shown = ", ".join(list(ids)[:5]) + (", ..." if len(ids) > 5 else "")
            log.warning("%s: unknown %s %r on %d image(s) (%s); %s", fname, col, value, len(ids), shown, consequence)


def _to_wide(df: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """Pivot validated long rows into one row per image with typed metadata, targets, labels and abs_path."""
    df = df.assign(target=values["target"], Pre_GSHH_NDVI=values["Pre_GSHH_NDVI"],
                   Height_Ave_cm=values["Height_Ave_cm"], month=values["month"])
    first = df.drop_duplicates("_prefix").set_index("_prefix")
    targets = df.pivot(index="_prefix", columns="target_name", values="target")
    wide = first[list(META_COLUMNS)].join(targets[list(TARGETS)].astype(float))
    wide["month"] = first["month"].astype(int)
    wide = wide.sort_index().rename_axis("sample_id_prefix").reset_index()
    wide["species_group"] = wide["Species"].map(species_group).astype(object)
    for aux in AUX_HEADS.values():
        wide[aux.column] = wide[aux.source].map(aux.to_index).astype(int)
    wide["abs_path"] = wide["sample_id_prefix"].map(first["_abs_path"]).astype(object)
    for col in ("sample_id_prefix", "image_path", "Sampling_Date", "State", "Species"):
        wide[col] = wide[col].astype(object)
    return wide


def _read_checked(base_path, name: str, columns) -> tuple[Path, pd.DataFrame, list[str]]:
    """Read BASE/name with the checks both files share (ids, image paths); returns (path, rows, problems)."""
    base = Path(base_path)
    path = base / name
    df = _read_csv(path, columns)
    problems: list[str] = []
    df["_prefix"] = _check_ids(df, path.name, problems)
    df["_abs_path"] = _check_image_paths(df, base, path.name, problems)
    return path, df, problems


def implausible_targets(wide: pd.DataFrame) -> list[str]:
    """Images whose targets break the competition's identities (GDM = Green + Clover, Total = Green + Dead +
    Clover; the real data hold both to rounding) or exceed MAX_PLAUSIBLE_G, one line each naming the values."""
    g, d, c, gdm, total = (wide[t].to_numpy(float) for t in TARGETS)
    lines = []
    for i, name in enumerate(wide["sample_id_prefix"]):
        parts = []
        if abs(gdm[i] - (g[i] + c[i])) > max(IDENTITY_TOLERANCE_G, IDENTITY_TOLERANCE_REL * gdm[i]):
            parts.append(f"GDM_g {gdm[i]:g} != Green + Clover {g[i] + c[i]:g}")
        if abs(total[i] - (g[i] + d[i] + c[i])) > max(IDENTITY_TOLERANCE_G, IDENTITY_TOLERANCE_REL * total[i]):
            parts.append(f"Dry_Total_g {total[i]:g} != Green + Dead + Clover {g[i] + d[i] + c[i]:g}")
        high = [f"{t} {wide[t].iloc[i]:g}" for t in TARGETS if wide[t].iloc[i] > MAX_PLAUSIBLE_G]
        if high:
            parts.append(f"above {MAX_PLAUSIBLE_G:g} g: {', '.join(high)}")
        if parts:
            lines.append(f"image {name}: {'; '.join(parts)}")
    return lines


def load_train(base_path: str | os.PathLike, strict: bool = False) -> pd.DataFrame:
    """Read and validate BASE/train.csv; return one row per image, sorted by sample_id_prefix.

    Columns: sample_id_prefix, image_path, Sampling_Date, State, Species, Pre_GSHH_NDVI, Height_Ave_cm, the five
    TARGETS (grams), month, species_group, state_idx, month_idx, species_idx (IGNORE_INDEX where unknown),
    abs_path. Raises DataError listing every problem found (file, line or sample_id, value). Implausible targets
    (`implausible_targets`) are a warning, an error when `strict`.
    """
    path, df, problems = _read_checked(base_path, "train.csv", TRAIN_COLUMNS)
    values = _parse_values(df, path.name, problems)
    _check_per_image(df, values, path.name, problems)
    _raise_if(problems, path)
    wide = _to_wide(df, values)
    implausible = implausible_targets(wide)
    if implausible and strict:
        raise DataError(f"{path}: {len(implausible)} image(s) with implausible targets:\n  " + "\n  ".join(implausible))
    if implausible:
        log.warning("%s: %d image(s) with implausible targets (an error with --strict):\n  %s", path.name,
                    len(implausible), "\n  ".join(implausible[:20]))
    _warn_labels(wide, path.name)
    shared = wide.loc[wide["image_path"].duplicated(keep=False)]
    for rel, ids in shared.groupby("image_path")["sample_id_prefix"]:
        log.warning("%s: image_path %r is used by several images %s", path.name, rel, list(ids))
    return wide


def load_test(base_path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate BASE/test.csv (no metadata needed).

    Returns (images, rows): `images` has one row per image in order of first appearance with sample_id_prefix,
    image_path, abs_path; `rows` holds the file's rows in order (sample_id, image_path, target_name) plus
    sample_id_prefix. Raises DataError listing every problem found.
    """
    path, df, problems = _read_checked(base_path, "test.csv", TEST_COLUMNS)
    for prefix, group in df.groupby("_prefix", sort=False):
        if group["image_path"].nunique() > 1:
            problems.append(f"{path.name} image {prefix} ({_lines(group['_line'])}): image_path disagrees between "
                            f"rows of the same image: {list(dict.fromkeys(group['image_path']))}")
    _raise_if(problems, path)
    rows = df[list(TEST_COLUMNS)].assign(sample_id_prefix=df["_prefix"].astype(object)).reset_index(drop=True)
    firsts = df.drop_duplicates("_prefix")
    images = pd.DataFrame({
        "sample_id_prefix": firsts["_prefix"].astype(object),
        "image_path": firsts["image_path"],
        "abs_path": firsts["_abs_path"].astype(object),
    }).reset_index(drop=True)
    return images, rows


def summarize_train(train: pd.DataFrame) -> str:
    """A few lines describing the training images: count, States, months, species groups, target means."""
    def counts(col: str) -> str:
        return ", ".join(f"{k}: {v}" for k, v in train[col].value_counts().sort_index().items())

    means = ", ".join(f"{t} {train[t].mean():.2f}" for t in TARGETS)
    return "\n".join([
        f"train.csv: {len(train)} images",
        f"  States: {counts('State')}",
        f"  months: {counts('month')}",
        f"  species groups: {counts('species_group')}",
        f"  target means (g): {means}",
    ])
