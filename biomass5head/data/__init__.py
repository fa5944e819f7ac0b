"""Data: the competition's tables, photos to tiles, folds, augmentation, mixing, torch datasets, feature cache."""
