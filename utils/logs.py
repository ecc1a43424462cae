"""Reading what the training scripts write: their TensorBoard logs and their error messages."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `run_dir`, as tag -> [(step, value), ...] in the order written."""
    # A resumed run's log starts with a purge marker, and TensorBoard warns that it drops the scalars
    # written after the checkpoint ("out of order event.step ... TensorFlow restart"): that is the intent.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        # Every event file starts with its version record; a file with no readable record is corrupt (TensorBoard would
        # skip it in silence). A file cut short by a crash keeps the records written before, and is read as they are.
        if next(iter(EventFileLoader(path).Load()), None) is None:
            raise ValueError(f"the event file {path} is corrupt: no record in it can be read")
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


def reason(stderr: str) -> str:
    """The line of a script's stderr that says why it stopped: its `error:` line, else the first line of tyro's framed
    message that names the problem."""
    lines = [line.strip("│╭╮╰╯─ ") for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    error = next((line.removeprefix("error: ") for line in lines if line.startswith("error:")), None)
    return error or next((line for line in lines if ":" in line), lines[0] if lines else "no message")
