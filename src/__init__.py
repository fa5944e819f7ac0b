"""The specification's `python -m src.<command>` entry points, kept as shims: the code is the `biomass5head`
package (installed), and these files are not installed."""
