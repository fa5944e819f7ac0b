"""5-head DINOv2 pasture biomass toolkit (CSIRO Image2Biomass)."""
import os

# albumentations asks PyPI for a newer version at import time; this toolkit must run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
