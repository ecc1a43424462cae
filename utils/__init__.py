"""Helpers around the three training scripts: evaluation, plots, sweeps, speed, logs. Each script trains without them."""
