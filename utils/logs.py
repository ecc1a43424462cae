"""Reading what the training scripts write: their TensorBoard logs and their error messages."""

import contextlib
import glob
import logging
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `run_dir`, as tag -> [(step, value), ...] in the order written (a resumed run's purge
    marker drops those written after its checkpoint, as intended), or ValueError for a corrupt event file."""
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # not its warning about the purged scalars
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        if next(iter(EventFileLoader(path).Load()), None) is None:  # TensorBoard would skip it in silence
            raise ValueError(f"the event file {path} is corrupt: no record in it can be read")
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@contextlib.contextmanager
def one_line_errors():
    """The scripts' contract (README): a failure is one `error:` line, exit code 2 (Ctrl-C: 130), its message (a SystemExit's
    or a ValueError's) or its type and message; TRACEBACK=1 shows the traceback instead."""
    try:
        yield
    except (SystemExit, Exception, KeyboardInterrupt) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str) or os.environ.get("TRACEBACK"):
            raise
        text = e.code if isinstance(e, SystemExit) else " ".join(str(e).split())  # on one line
        message = text.removeprefix("error: ") if isinstance(e, SystemExit | ValueError) else f"{type(e).__name__}: {text}"
        print(f"error: {message}".rstrip(": "), file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)


def reason(stderr: str) -> str:
    """Why a script stopped: its `error:` line, else the first line of tyro's framed message that names the problem."""
    lines = [line for line in (line.strip("│╭╮╰╯─ ") for line in stderr.splitlines()) if line]
    error = next((line.removeprefix("error: ") for line in lines if line.startswith("error:")), None)
    return error or next((line for line in lines if ":" in line), lines[0] if lines else "no message")
