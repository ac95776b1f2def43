"""Where a step runs: its torch device, its share of the CPU cores, and a record of both.

Merge, evaluate and kinship enter `running_step` first thing, in the thread or process that does
the work: torch's intra-op thread count is set there (beside other busy processes torch's default
of one OpenMP thread per core stalls 10-30x, measured), and the record says where the step ran
(Dask worker, host, pid, device) and when, so overlaps can be counted across processes.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STEP_KINDS = ("merge", "evaluate", "kinship")


def gpu_driver_visible() -> bool:
    """Whether a GPU driver torch could use is visible to this process, decided without importing
    torch (2-3 s of CPU): an NVIDIA driver (/proc/driver/nvidia/gpus lists a GPU) or ROCm's
    /dev/kfd, unless CUDA_VISIBLE_DEVICES hides every device ("" or "-1")."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/kfd").exists()


def resolve_device(name: str = "auto") -> str:
    """Map a configured device to a torch device string. `auto` picks CUDA when torch finds it,
    asking torch only when `gpu_driver_visible()` (else: cpu, and torch is not imported)."""
    if name == "auto":
        if not gpu_driver_visible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device '{name}' requested but CUDA is not available on this worker"
            )
    return name


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_share(concurrent_steps: int) -> int:
    """Intra-op threads for one of `concurrent_steps` steps: cores ÷ steps, at least 1."""
    return max(1, available_cores() // max(1, concurrent_steps))


def set_threads(threads: int) -> None:
    """torch's intra-op threads, if this process has imported torch: a torch-free step (kinship
    on the CPU, numpy on one thread) does not import it for this."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _dask_worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker
        return None


def worker_threads() -> int:
    """A step's threads when the worker decides: OMP_NUM_THREADS if its launcher set it (the
    temporary cluster does: cores ÷ its task slots), else cores ÷ the worker's task slots."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    worker = _dask_worker()
    return cpu_share(worker.state.nthreads if worker else 1)


def settle_heap() -> None:
    """Collect garbage, then freeze what is left (the imported libraries' ~680k objects) out of
    the collector's sight. Every step ends with a full collection to release what it loaded;
    without this each one rescans those objects: 0.4 s a collection on this machine, 12 s of a
    cached default-zoo run's 14 reused merges (measured with py-spy). Objects made later are
    collected as before. Call once the libraries are imported, in each process that runs steps."""
    gc.collect()
    gc.freeze()


@contextmanager
def running_step(kind: str, threads: int | None, device: str = "cpu") -> Iterator[dict[str, Any]]:
    """Run a step with `threads` intra-op threads (None: `worker_threads()`); yields its record,
    completed on exit with `started`/`ended` (epoch seconds) and `seconds`. On exit what the step
    loaded is released (garbage collected, CUDA cache emptied) so the next step has the memory."""
    threads = worker_threads() if threads is None else max(1, threads)
    set_threads(threads)
    worker = _dask_worker()
    record: dict[str, Any] = {
        "kind": kind,
        "worker": worker.name if worker else None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "device": device,
        "threads": threads,
        "started": time.time(),
    }
    try:
        yield record
    finally:
        gc.collect()
        if device.startswith("cuda"):
            sys.modules["torch"].cuda.empty_cache()
        record["ended"] = time.time()
        record["seconds"] = round(record["ended"] - record["started"], 3)


def peak_overlap(records: Iterable[Mapping[str, Any]]) -> int:
    """The most steps running at once, from the steps' own start and end records."""
    events = sorted(
        [(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak
