"""Named bundles of training defaults (`--recipe`): `reference` keeps the specification's defaults, `robust` is the
small-data recipe for frozen-feature training that the model-quality work chose (README, "Recipes").

Each entry maps a train_5head option (its argparse dest) to the value the recipe gives it; an option given on the
command line always wins, and the resolved values land in config.json.
"""
from __future__ import annotations

ROBUST: dict[str, object] = {
    "select_on": "inner",
    "target_transform": "sqrt",
    "ridge_base": True,
    "refit": True,
    "ridge_select": "cv",
}

RECIPE_DEFAULTS: dict[str, dict[str, object]] = {"reference": {}, "robust": ROBUST}
# A recipe value that another option given on the command line overrides (--use-log-target means log1p).
RECIPE_YIELDS: dict[str, tuple[str, ...]] = {"target_transform": ("use_log_target",)}
# A recipe value that applies only where another option has a value (the ridge is fitted on frozen features; the
# refit retrains up to the epoch chosen on the inner split).
RECIPE_NEEDS: dict[str, tuple[str, object]] = {"ridge_base": ("freeze_backbone", True), "refit": ("select_on", "inner")}


def applies(dest: str, values: dict) -> bool:
    """Whether a recipe's value for option `dest` applies, given the values the run will have (RECIPE_NEEDS)."""
    need = RECIPE_NEEDS.get(dest)
    return need is None or values.get(need[0]) == need[1]


def describe(recipe: str) -> str:
    """`--flag value, ...` of a recipe, for --help and the log."""
    parts = []
    for dest, value in RECIPE_DEFAULTS[recipe].items():
        flag = "--" + dest.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return ", ".join(parts) or "the specification's defaults"
