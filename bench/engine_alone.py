"""The physical limit: the engine alone, in-process, on already-decoded 128x128 tensors; and `flat_out`, which runs
any in-process job that way (the in-process pipeline of bench/profile_request.py too).

Runs `processes` processes, each with its own engine of `threads` threads (the layout the stack uses), all started
together on a barrier, and counts calls per second over `seconds`. Nothing but the job runs in the timed loop.
`tree` runs the job on another checkout's segapp (a baseline worktree) instead of this one's.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

WARM_UP_CALLS = 5  # first invocations allocate and plan


def use_tree(tree: str | Path) -> str:
    """Make this process import segapp from `tree`; returns the folder of the segapp it now imports."""
    # The venv has this checkout's segapp installed in editable mode, through a finder that setuptools appends to
    # sys.meta_path, after the path finder: a tree first on sys.path wins over it. A spawned child has imported
    # this checkout's segapp already (it re-imports bench.run), so that copy is forgotten first.
    sys.path.insert(0, str(tree))
    for name in [m for m in sys.modules if m == "segapp" or m.startswith("segapp.")]:
        del sys.modules[name]
    return segapp_folder()


def segapp_folder() -> str:
    """The folder of the segapp package this process imports."""
    import segapp

    return str(Path(segapp.__file__).resolve().parent)


def _worker(setup, args, tree, seconds: float, barrier, results) -> None:
    # The job's own output (the in-process app's access log, one line a request) would flood the benchmark's;
    # the stack's goes to its log file. A failure comes back through `results`.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        if tree:
            use_tree(tree)
        call, about = setup(*args)
        about["segapp"] = segapp_folder()
        for _ in range(WARM_UP_CALLS):
            call()
    except BaseException:
        barrier.abort()
        results.put(("error", traceback.format_exc()))
        raise
    barrier.wait()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        count += 1
    results.put((count, elapsed, about))


def flat_out(setup, args: tuple, processes: int, seconds: float, tree: str | Path | None = None) -> dict:
    """Calls per second of `processes` processes each calling, flat out for `seconds`, the callable that
    `setup(*args)` returns with a dict about it; `setup` must be a module-level function (it is pickled by name)."""
    context = multiprocessing.get_context("spawn")  # each process loads its own engine, as uWSGI's lazy-apps does
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_worker, args=(setup, args, str(tree) if tree else None, seconds, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=seconds + 300) for _ in workers]
    for worker in workers:
        worker.join()
    errors = [count[1] for count in counts if count[0] == "error"]
    if errors:
        raise RuntimeError(f"an in-process bench worker failed:\n{errors[0]}")
    per_s = sum(count / elapsed for count, elapsed, _ in counts)
    return {
        "processes": processes,
        "per_s": round(per_s, 2),
        "ms_per_call_per_process": round(1000 * processes / per_s, 3),
        **counts[0][2],
    }


def _engine(model: str, threads: int):
    import numpy as np

    try:
        from segapp.engines import open_engine
        from segapp.inference import SHIPPED_MODEL
    except ImportError:  # a baseline tree from before segapp.engines (issue 16)
        from segapp.config import Settings
        from segapp.inference import make_engine as open_engine

        SHIPPED_MODEL = Settings().model
    model = model or str(SHIPPED_MODEL)  # the tree's own shipped default
    engine = open_engine(model, threads)
    # The network's own input shape (a baseline tree's engines do not say it: its model took 128x128x3).
    shape = (1, *engine.input.shape[1:]) if hasattr(engine, "input") else (1, 128, 128, 3)
    batch = np.random.default_rng(0).random(shape).astype(np.float32)
    return (lambda: engine.predict(batch)), {"model": model}


def engine_alone(model: str, processes: int, threads: int, seconds: float, tree: str | Path | None = None) -> dict:
    """Images per second of `processes` x `threads` engines running flat out, and milliseconds per image; `model`
    empty: the tree's default."""
    figures = flat_out(_engine, (model, threads), processes, seconds, tree)
    return {
        "processes": processes,
        "threads": threads,
        "images_per_s": figures["per_s"],
        "ms_per_image_per_process": figures["ms_per_call_per_process"],
        "model": figures["model"],
        "segapp": figures["segapp"],
    }
