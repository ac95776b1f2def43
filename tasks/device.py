"""Where a step runs: its torch device, its share of the CPU cores, and a record of both.

Merge, evaluate and kinship enter `running_step` first thing, in the thread or process that does
the work: torch's intra-op thread count is set per thread there (a busy host stalls torch's
default of one OpenMP thread per core by 10-30x, measured), and the record says where the step ran
and how many steps of this process overlapped it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_active: dict[int, int] = {}  # step id -> most steps seen running at once while it ran
_active_lock = threading.Lock()
_next_id = iter(range(1 << 62))


def resolve_device(name: str = "auto") -> str:
    """Map a configured device to a torch device string; `auto` picks CUDA when present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this worker")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
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


@contextmanager
def running_step(kind: str, threads: int, device: str = "cpu") -> Iterator[dict[str, Any]]:
    """Run a step with `threads` intra-op threads; yields its record, completed on exit.

    The record names the host, pid, thread and device, the seconds the step took and
    `peak_concurrent`: the most steps of this process (of any kind) running at once while it ran.
    """
    torch.set_num_threads(max(1, threads))
    with _active_lock:
        step_id = next(_next_id)
        _active[step_id] = 0
        for other in _active:
            _active[other] = max(_active[other], len(_active))
    record: dict[str, Any] = {
        "kind": kind,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "device": device,
        "threads": threads,
    }
    started = time.perf_counter()
    try:
        yield record
    finally:
        with _active_lock:
            record["peak_concurrent"] = _active.pop(step_id)
        record["seconds"] = round(time.perf_counter() - started, 3)
