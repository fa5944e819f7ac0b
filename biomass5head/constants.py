"""Names and label spaces shared by every module: targets, their weights, and the auxiliary classes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The five targets, in this order everywhere (heads, --target-weights, outputs).
TARGETS: tuple[str, ...] = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
TARGET_SHORT: tuple[str, ...] = ("Green", "Dead", "Clover", "GDM", "Total")
GREEN, DEAD, CLOVER, GDM, TOTAL = range(5)

# The --cv-strategy choices (data.folds.make_folds).
CV_STRATEGIES: tuple[str, ...] = (
    "group_month", "group_date", "group_date_state", "group_date_state_bin", "stratified", "random",
)

# Weights of the competition's global weighted R2.
COMPETITION_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.1, 0.2, 0.5)

STATES: tuple[str, ...] = ("NSW", "Tas", "Vic", "WA")
MONTHS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 8, 9, 10, 11)
SPECIES_GROUPS: tuple[str, ...] = (
    "Clover", "Ryegrass", "Ryegrass_Clover", "Phalaris", "Phalaris_Clover", "Fescue", "Lucerne", "Other",
)
# Raw Species strings of the competition and the group each belongs to; anything else is "Other".
SPECIES_TO_GROUP: dict[str, str] = {
    "Clover": "Clover",
    "WhiteClover": "Clover",
    "SubcloverLosa": "Clover",
    "SubcloverDalkeith": "Clover",
    "Ryegrass": "Ryegrass",
    "Ryegrass_Clover": "Ryegrass_Clover",
    "Phalaris": "Phalaris",
    "Phalaris_Clover": "Phalaris_Clover",
    "Phalaris_Ryegrass_Clover": "Phalaris_Clover",
    "Phalaris_BarleyGrass_SilverGrass_SpearGrass_Clover_Capeweed": "Phalaris_Clover",
    "Phalaris_Clover_Ryegrass_Barleygrass_Bromegrass": "Phalaris_Clover",
    "Fescue": "Fescue",
    "Fescue_CrumbWeed": "Fescue",
    "Lucerne": "Lucerne",
    "Mixed": "Other",
}
IGNORE_INDEX = -1  # label value the auxiliary losses skip (unknown state, month outside MONTHS)


def species_group(species: str) -> str:
    """Group name of a raw Species string; unseen strings fall into "Other"."""
    return SPECIES_TO_GROUP.get(str(species), "Other")


def species_index(species: str) -> int:
    return SPECIES_GROUPS.index(species_group(species))


def state_index(state: str) -> int:
    """Class index of a State, IGNORE_INDEX when it is not one of STATES."""
    return STATES.index(state) if state in STATES else IGNORE_INDEX


def month_index(month: int) -> int:
    """Class index of a sampling month, IGNORE_INDEX for a month outside the competition's ten."""
    return MONTHS.index(int(month)) if int(month) in MONTHS else IGNORE_INDEX


@dataclass(frozen=True)
class AuxHead:
    """One auxiliary head (--use-aux-heads): the metadata column of train.csv it predicts, its label column in the
    training table (`data.tables.load_train`; IGNORE_INDEX where unknown), its classes in output order, and the
    function from a metadata value to a class index."""
    source: str
    column: str
    classes: tuple
    to_index: Callable[[object], int]


# The auxiliary heads, in this order everywhere (model outputs, losses, accuracies, context adjustment).
AUX_HEADS: dict[str, AuxHead] = {
    "state": AuxHead("State", "state_idx", STATES, state_index),
    "month": AuxHead("month", "month_idx", MONTHS, month_index),
    "species": AuxHead("Species", "species_idx", SPECIES_GROUPS, species_index),
}
