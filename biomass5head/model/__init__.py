"""The model: timm backbone, the five heads, target transform, post-processing, checkpoints, batched prediction."""
