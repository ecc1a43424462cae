"""--track: a run tracked offline with Weights & Biases records its arguments and TensorBoard scalars, and a resumed
run continues the same W&B run."""

import glob
import hashlib
import importlib
import json
import os
import sys

import pytest
from helpers import only_run_dir

SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]


def wandb_records(path: str) -> list:
    """The protobuf records of a W&B run file (`run-<id>.wandb`): a 7-byte header (":W&B", a magic number, a version),
    then LevelDB-style blocks of 32 KiB whose chunks are framed by a checksum (4 bytes), a length (2, little-endian) and
    a type (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_tracked_run_records_config_and_scalars_offline_and_its_resume_continues_it(script, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing touches the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # this test's folder, not the first tracked run's of this process
    algo = importlib.import_module(script)
    args = algo.Args(
        env_id="InvertedPendulum-v5", total_timesteps=128, num_steps=64, num_minibatches=2, track=True, save_model=True
    )
    algo.train(args)
    run_dir = only_run_dir()
    algo.train(algo.Args(resume=os.path.join(run_dir, f"{script}.pt"), total_timesteps=192))

    import wandb

    wandb.teardown()  # the next test's W&B starts afresh, with its own folder
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    expected_id = hashlib.sha1(os.path.basename(run_dir).encode()).hexdigest()[:16]
    assert files and {os.path.basename(f) for f in files} == {f"run-{expected_id}.wandb"}  # one W&B run, resumed
    records = [record for f in files for record in wandb_records(f)]
    config = {}
    for record in records:  # the run's config comes with its `run` record (and any later `config` record)
        updates = (
            record.run.config.update if record.HasField("run") else record.config.update if record.HasField("config") else []
        )
        for item in updates:
            value = json.loads(item.value_json)
            config[item.key] = value.get("value", value) if isinstance(value, dict) else value
    assert config["env_id"] == "InvertedPendulum-v5" and config["track"] is True and config["num_steps"] == 64
    scalars = {}
    for record in records:
        if record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                scalars.setdefault(key, []).append((row.get("global_step"), value))
    assert {"charts/SPS", "charts/episodic_return", "losses/value_loss", "perf/update_time"} <= scalars.keys()
    assert sorted(step for step, _ in scalars["charts/SPS"]) == [64, 128, 192]  # two iterations, then the resumed one


def test_track_without_wandb_is_refused_before_anything_is_built(monkeypatch):
    algo = importlib.import_module("ppo_continuous")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    with pytest.raises(ModuleNotFoundError, match="wandb"):
        algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=64, num_steps=64, track=True))
    assert not os.path.exists("runs")  # the setup failed: its run directory is gone
