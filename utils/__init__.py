"""Helpers around the three training scripts: evaluation, plots, benchmarks, reading logs.

Nothing algorithmic lives here; each `*_continuous.py` script trains without this package.
"""
