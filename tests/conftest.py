import os

import pytest
import torch

# The networks are tiny: one thread per test process is faster, and the suite runs tests in parallel.
torch.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder, so `runs/` never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
