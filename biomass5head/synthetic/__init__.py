"""Synthetic data in the competition's layout: real distributions, drawn photos, writing a data set."""
