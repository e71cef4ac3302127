"""Fault injection for end-to-end tests of launch/train.py (tests only).

With tests/faults on PYTHONPATH, Python imports this module at start-up in every process; it acts
only in processes running launch/train.py (torchrun's workers, srun's tasks) and only when
METAGAN_TEST_FAULTS holds a JSON object, whose keys each patch metagan_dist before train.py imports
from it:

    "nan_grads": {"rank": 1, "from_step": 3, "to_step": 3}
        that rank's meta-gradient is NaN at meta-steps from_step..to_step (counted from the start
        of this process; to_step null = for ever)
    "signal_at_step": {"rank": 1, "step": 3, "signal": "SIGTERM"}
        that rank sends itself the signal while computing that meta-step (so the run stops there)
    "slow_stop_checkpoint_s": 35
        once a stop signal has arrived, rank 0 sleeps this long before writing the checkpoint's
        trainer.pt (a slow file system, met by the stop path)
    "slow_set_up": {"rank": 1, "seconds": 8, "marker": "/path"}
        that rank sleeps while opening its task stream, after creating the marker file
    "set_up_error": {"rank": 1, "type": "PermissionError", "message": "..."}
        that rank fails to open its task stream with this error
"""

import builtins
import json
import os
import signal
import sys
import time
from pathlib import Path


def _install(faults: dict) -> None:
    import metagan_dist
    import metagan_dist.checkpoint
    from metagan_dist.data import TaskStream

    rank = int(os.environ.get("RANK", 0))

    nan = faults.get("nan_grads") or {"rank": None}
    stop = faults.get("signal_at_step") or {"rank": None}
    if rank in (nan["rank"], stop["rank"]):
        real, calls = metagan_dist.meta_gradients, [0]

        def meta_gradients(*args, **kwargs):
            grads = real(*args, **kwargs)
            calls[0] += 1
            if rank == nan["rank"] and calls[0] >= nan["from_step"] and calls[0] <= (nan["to_step"] or calls[0]):
                grads.flat[0] = float("nan")
            if rank == stop["rank"] and calls[0] == stop["step"]:
                os.kill(os.getpid(), getattr(signal, stop["signal"]))
            return grads

        metagan_dist.meta_gradients = meta_gradients

    if (seconds := faults.get("slow_stop_checkpoint_s")) and rank == 0:
        from metagan_dist.distributed import StopSignal

        real_save, real_handle, stopping = metagan_dist.checkpoint.save_file_atomic, StopSignal._handle, []

        def handle(self, signum, frame):
            stopping.append(signum)
            real_handle(self, signum, frame)

        def save_file_atomic(obj, path):
            if path.name == "trainer.pt" and stopping:
                print(f"faults: writing {path} slowly ({seconds} s)", file=sys.stderr, flush=True)
                time.sleep(seconds)
            real_save(obj, path)

        StopSignal._handle = handle
        metagan_dist.checkpoint.save_file_atomic = save_file_atomic

    real_init = TaskStream.__init__

    def init(self, *args, **kwargs):
        if (slow := faults.get("slow_set_up")) and slow["rank"] == rank:
            Path(slow["marker"]).touch()
            time.sleep(slow["seconds"])
        if (error := faults.get("set_up_error")) and error["rank"] == rank:
            raise getattr(builtins, error["type"])(error["message"])
        real_init(self, *args, **kwargs)

    TaskStream.__init__ = init


if os.environ.get("METAGAN_TEST_FAULTS") and sys.argv and sys.argv[0].endswith(os.path.join("launch", "train.py")):
    _install(json.loads(os.environ["METAGAN_TEST_FAULTS"]))
