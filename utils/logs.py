"""Reading the TensorBoard logs that the training scripts write."""

from __future__ import annotations

import contextlib
import logging
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `run_dir`, as tag -> [(step, value), ...] in the order written."""
    # A resumed run's log starts with a purge marker, and TensorBoard warns that it drops the scalars
    # written after the checkpoint ("out of order event.step ... TensorFlow restart"): that is the intent.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@contextlib.contextmanager
def one_line_errors():
    """For a `utils` command's `__main__`: a `SystemExit("error: ...")` raised for bad input leaves with exit code 2, as
    the training scripts do (Python's own exit code for a message is 1); other exits pass through."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
