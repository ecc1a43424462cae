import importlib
import os

import pytest
import torch

# The networks are tiny: one thread per test process is faster, and the suite runs tests in parallel.
torch.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")

SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder, so `runs/` never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def eager_minibatch_step(request, monkeypatch):
    """Training runs inside the test process take the minibatch step uncompiled (the same function, eagerly), as with
    --no-compile: compiling it costs 15-35 s a run. The tests marked `compiled` take the compiled step, and so do the
    scripts run as their own processes unless given --no-compile."""
    if "compiled" in request.keywords:
        return
    for name in SCRIPTS:
        monkeypatch.setattr(importlib.import_module(name), "compiled", lambda step: step)
