"""The physical limit: the engine alone, in-process, on already-decoded 128x128 tensors.

Runs `processes` processes of `threads` engine threads each, the layout the stack uses, all started together,
and counts images per second over `seconds`. Nothing but the engine runs in the timed loop.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np


def _worker(model: str, threads: int, seconds: float, barrier, results) -> None:
    from segapp.inference import make_engine

    engine = make_engine(model, threads)
    batch = np.random.default_rng(0).random((1, 128, 128, 3)).astype(np.float32)
    for _ in range(5):  # warm-up: first invocations allocate and plan
        engine.predict(batch)
    barrier.wait()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        engine.predict(batch)
        count += 1
    results.put((count, elapsed))


def engine_alone(model: str, processes: int, threads: int, seconds: float) -> dict:
    """Images per second of `processes` x `threads` engines running flat out, and milliseconds per image."""
    context = multiprocessing.get_context("spawn")  # each process loads its own engine, as uWSGI's lazy-apps does
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_worker, args=(model, threads, seconds, barrier, results)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    images_per_s = sum(count / elapsed for count, elapsed in counts)
    return {
        "processes": processes,
        "threads": threads,
        "images_per_s": round(images_per_s, 2),
        "ms_per_image_per_process": round(1000 * processes / images_per_s, 3),
    }
