"""Reading the TensorBoard logs that the training scripts write."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `run_dir`, as tag -> [(step, value), ...] in the order written."""
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
