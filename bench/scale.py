"""Benchmark: memory, disk traffic and disk use of the real flow at model sizes up to 1B+.

    python -m bench.scale [--sizes 60M,250M,1B] [--runtime local,dask] [--device cpu|cuda]
                          [--generations 1] [--workdir DIR] [--keep] [--skip-alloc]

For each size (bench/families.py SCALE_SHAPES: Llama-shaped, bf16, 1 GB shards, a byte-level
BPE tokenizer trained offline, the embedding padded to 32000 rows) it builds a base and three
foundations, writes a small local lm-eval task (--docs multiple-choice documents), then:

1. Steps alone. Each step's plain function (the Prefect task's `.fn`, with the config the flow
   would compose) runs alone in a child process that imports everything first, so the figures
   are the step's own: peak RSS above the idle process's (VmHWM after resetting it through
   /proc/self/clear_refs, minus VmRSS before the step, the heap trimmed first), and apart from
   it the anonymous part (RssAnon, sampled from another process): VmRSS also counts the mapped
   pages of the safetensors a step reads, page cache the kernel reclaims under pressure, so the
   merge goal is judged on the anonymous part. Bytes read and written
   (/proc/self/io read_bytes/write_bytes, every thread of the process), wall time, and on CUDA
   torch.cuda.max_memory_allocated. The step's input files are evicted from the page cache first
   (posix_fadvise DONTNEED), so read_bytes counts what a cold run reads from the disk. Steps:
   fetch (resolve + preflight with check_finite, first without and then with the fingerprint
   sidecars), kinship (the 3 foundations' matrix), merge (two foundations, the configured method
   and dtype), evaluate (one foundation on the task).
2. The whole flow, per runtime: `python -m flows.evolve` as the command of a DVC stage whose
   outputs are data/store and data/state (persist: true, as in dvc.yaml), in a fresh DVC repo
   that takes its cache settings from the project's .dvc/config. `dvc repro` (run 1), then, with
   the page cache evicted, `dvc repro -f` (a re-run that has nothing to redo; DVC copies the
   persisted store first, so the flow re-hashes it), then the stage's command alone (how
   docs/operations.md says to resume: no copy, nothing re-hashed). For each: wall
   time, peak RSS of the process tree (sampled), bytes read and written by the whole tree
   (getrusage(RUSAGE_CHILDREN), which sums every reaped descendant's read_bytes/write_bytes),
   and the flow's own share of them (its command is wrapped to report its own RUSAGE_CHILDREN);
   on CUDA the GPU memory used (nvidia-smi, sampled). Disk: `du` of the store and the DVC cache
   together (an inode once, so hard links count once; reflinks are not seen and count twice)
   over the bytes the store keeps.
3. One synthetic Dask step that allocates more than RAM ÷ cores (and touches it) on a
   temporary cluster built from the default runtime=dask config: did it complete?

Each figure is printed beside its goal (issue 18), with its value at 7B (14.5 GB in bf16) by
scaling with the model's bytes; times scale linearly too (a rough figure). Results also go to
WORKDIR/scale.json. The driver imports no torch: its RSS stays out of the figures.
"""

from __future__ import annotations

import argparse
import configparser
import ctypes
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BYTES_7B = 14.5e9  # a 7B model in bf16 (Mistral-7B: 7.24B parameters)
FAMILY = "llama"
N_FOUNDATIONS = 3
TASK = "scale_mc"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TQDM_DISABLE": "1",
}
# goal name -> (limit, how it compares); the figures are ratios to one model's bytes
GOALS = {
    "merge_rss": (1.5, "<="),
    "evaluate_rss_cpu": (1.3, "<="),
    "merge_written": (1.0, "=="),
    "disk": (1.05, "<="),
    "rerun_read": (0.05, "<="),
}


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, **OFFLINE, "PYTHONPATH": f"{ROOT}:{path}" if path else str(ROOT)}


# -- /proc readings --------------------------------------------------------------------------------


def proc_io(pid: str = "self") -> dict[str, int]:
    text = Path(f"/proc/{pid}/io").read_text()
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def proc_status(key: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


MEMORY_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_memory(pid: str = "self") -> dict[str, int]:
    """VmRSS and its parts: RssAnon (memory the process holds), RssFile (mapped file pages, e.g.
    the parents' mmapped safetensors: page cache the kernel may reclaim) and RssShmem."""
    out = dict.fromkeys(MEMORY_KEYS, 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in out:
            out[key] = int(line.split()[1]) * 1024
    return out


class StatusSampler:
    """The RSS parts of this process, sampled every `interval` s by a separate process (a thread
    here would wait for the GIL while a step holds it, and miss the peak): the peak of the
    anonymous part (VmHWM cannot tell the parts apart) and the parts at the total's peak."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_anon = 0
        self.at_peak = dict.fromkeys(MEMORY_KEYS, 0)

    def __enter__(self) -> StatusSampler:
        cmd = [
            sys.executable,
            "-m",
            "bench.scale",
            "--sample",
            str(os.getpid()),
            str(self.interval),
        ]
        self._proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": sampling has started
        return self

    def __exit__(self, *_: Any) -> None:
        out, _ = self._proc.communicate("")  # closing its stdin stops it
        found = json.loads(out.strip().splitlines()[-1])
        self.peak_anon, self.at_peak = found["peak_anon"], found["at_peak"]


def sample(pid: str, interval: float) -> None:
    """StatusSampler's process: sample `pid` until stdin closes, then print the peaks."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    peak_anon, at_peak = 0, dict.fromkeys(MEMORY_KEYS, 0)
    print("ready", flush=True)
    while True:
        last = stop.is_set()
        now = proc_memory(pid)
        peak_anon = max(peak_anon, now["RssAnon"])
        at_peak = now if now["VmRSS"] > at_peak["VmRSS"] else at_peak
        if last:
            break
        time.sleep(interval)
    print(json.dumps({"peak_anon": peak_anon, "at_peak": at_peak}), flush=True)


def files_under(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in path.rglob("*") if p.is_file()]
    return out


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first), so the next read of them
    comes from the disk and shows in read_bytes. Only these files: others' caches stay."""
    for path in files_under(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def disk_use(store: Path, cache: Path) -> dict[str, int]:
    """Blocks used by the store and the cache together, each inode once (as one `du` over
    both), and the bytes the store keeps (its files' sizes, links followed)."""
    seen: set[tuple[int, int]] = set()
    used = kept = 0
    for root, counts_kept in ((store, True), (cache, False)):
        for path in files_under([root]) if root.exists() else []:
            st = path.stat()  # follows symlinks: a linked store file counts its target
            kept += st.st_size if counts_kept else 0
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += st.st_blocks * 512
    return {"used": used, "kept": kept}


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fs = line.split()[:3]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fs
    return kind


# -- building the inputs ---------------------------------------------------------------------------


def build_family(size: str, out: Path) -> list[Path]:
    """[base, ft1..ft3] of `size` under `out` (in a child process; reused when complete)."""
    folders = [out / FAMILY / n for n in ["base", *(f"ft{i + 1}" for i in range(N_FOUNDATIONS))]]
    if not all((f / "config.json").is_file() for f in folders):
        code = (
            "import sys; from pathlib import Path; from bench.families import SCALE_SHAPES, "
            f"make_family; make_family(Path(sys.argv[1]), {FAMILY!r}, "
            f"n_variants={N_FOUNDATIONS}, shape=SCALE_SHAPES[sys.argv[2]])"
        )
        started = time.perf_counter()
        cmd = [sys.executable, "-c", code, str(out), size]
        subprocess.run(cmd, check=True, cwd=ROOT, env=child_env())
        print(f"  built {size}: base + {N_FOUNDATIONS} in {time.perf_counter() - started:.0f} s")
    return folders


def write_task(folder: Path, n_docs: int) -> Path:
    """A multiple-choice lm-eval task on `n_docs` sums, in the zoo's prompt format."""
    import yaml

    from tasks.zoo.build import task_yaml

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_docs):
        a, b = 1 + i % 9, 2 + (i * 7) % 11
        choices = [str(a + b), str(a + b + 3)] if i % 2 else [str(a + b + 3), str(a + b)]
        rows.append(
            {"prompt": f"add {a}+{b}=", "choices": choices, "label": choices.index(str(a + b))}
        )
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a zoo task's config (multiple choice, acc) on this bench's own rows
    task = {**task_yaml(TASK), "task": TASK, "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def flow_overrides(
    root: Path, models: list[Path], tasks: Path, runtime: str, device: str, generations: int
) -> list[str]:
    foundations = ",".join(f"'{m}'" for m in models[1:])
    return [
        "+experiment=greedy_kinship",
        f"paths.root={root}",
        f"hydra.run.dir={root}/hydra",
        f"models.base='{models[0]}'",
        f"models.foundations=[{foundations}]",
        f"eval.include_path='{tasks}'",
        f"eval.tasks=[{TASK}]",
        "strategy.k=2",
        f"strategy.stop.max_generations={generations}",
        f"device={device}",
        f"runtime={runtime}",
        "runtime.progress=false",
    ]


# -- 1. steps alone (child process) ----------------------------------------------------------------


def compose_typed(overrides: list[str]) -> Any:
    """The config the flow would run with these overrides (composed and validated as it does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from flows.run.schema import validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return validate(hydra_compose(config_name="config", overrides=overrides))


def compose(overrides: list[str]) -> dict[str, Any]:
    """`compose_typed`'s config as plain data, the form the steps receive."""
    from flows.run.schema import as_dict

    return as_dict(compose_typed(overrides))


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one step's plain function as the flow would, measured; `spec` from `run_step`."""
    import torch

    from flows.run.inputs import evaluation_settings
    from tasks.core.device import settle_heap
    from tasks.core.store import FINGERPRINT_FILE
    from tasks.core.weights import effective_dtype
    from tasks.evaluate import evaluate_task, import_libraries
    from tasks.fetch import fetch_task, preflight
    from tasks.kinship import kinship_matrix_task
    from tasks.merge import merge_identity, merge_task

    cfg = compose(spec["overrides"])
    models = [Path(m) for m in spec["models"]]
    threads, device, kind = spec["threads"], cfg["device"], spec["step"]
    fetch_options = {
        "root": Path(cfg["paths"]["root"]),
        "zoo_dir": None,
        "zoo_manifest": None,
        "allow_pickle": cfg["models"]["allow_pickle"],
        "trust_remote_code": cfg["models"]["trust_remote_code"],
    }

    def fetch() -> list[Any]:
        resolved = [fetch_task.fn(str(m), fetch_options) for m in models]
        preflight(
            resolved[0],
            resolved[1:],
            vocab_mismatch=cfg["kinship"]["vocab_mismatch"],
            finite=cfg["models"]["check_finite"],
        )
        return resolved

    import_libraries()
    import mergekit.merge  # noqa: F401 - imported before the idle reading, as in a worker

    if kind == "fetch_first":
        for m in models:
            (m / FINGERPRINT_FILE).unlink(missing_ok=True)
        resolved = None
    else:
        resolved = fetch()  # fingerprints (sidecars) as the flow has them before the step
    base, found = (resolved[0], resolved[1:]) if resolved else (None, [])
    out = Path(spec["scratch"]) / "merged"
    if kind == "fetch_first" or kind == "fetch_again":
        step, inputs = fetch, models
    elif kind == "kinship":

        def step() -> Any:
            return kinship_matrix_task.fn(
                [m.path for m in found],
                [m.fingerprint for m in found],
                base.path,
                base.fingerprint,
                cfg["kinship"],
                device,
                threads,
            )

        inputs = models
    elif kind == "merge":
        merge, parents = cfg["merge"], found[:2]
        params = {"parameters": merge["parameters"], "model_parameters": merge["model_parameters"]}
        dtype = effective_dtype(merge["dtype"], [Path(p.path) for p in parents])
        # the request the lab builds (flows/run/lab.py Lab._submit_merge)
        request = {
            "merge_id": merge_identity(
                [p.fingerprint for p in parents],
                merge["method"],
                params,
                base_fingerprint=base.fingerprint,
                dtype=dtype,
                seed=cfg["seed"],
            ),
            "parents": [p.path for p in parents],
            "out_dir": str(out),
            "method": merge["method"],
            "params": params,
            "base": base.path,
            "dtype": dtype,
            "device": device,
            "seed": cfg["seed"],
            "options": merge.get("options"),
        }
        shutil.rmtree(out, ignore_errors=True)

        def step() -> Any:
            return merge_task.fn(request, threads)

        inputs = models
    elif kind == "evaluate":
        settings = evaluation_settings(compose_typed(spec["overrides"]), None)
        settings["samples_dir"] = str(Path(spec["scratch"]) / "samples")

        def step() -> Any:
            return evaluate_task.fn(found[0].path, found[0].fingerprint, settings, threads)

        inputs = [models[1]]
    else:
        raise SystemExit(f"unknown step {kind}")

    settle_heap()
    # hand the heap that fetch() freed back to the OS: else the step reuses it unseen and its
    # RSS above idle understates what it needs (measured: 0.11x instead of 1.1x for a merge)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    evict(inputs)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    idle = proc_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    io0, started = proc_io(), time.perf_counter()
    with StatusSampler() as sampled:
        step()
    wall, io1 = time.perf_counter() - started, proc_io()
    result = {
        "step": kind,
        "seconds": round(wall, 2),
        "idle_rss": idle["VmRSS"],
        "peak_rss": proc_status("VmHWM"),
        # the anonymous part: VmHWM also counts mapped file pages (reclaimable page cache)
        "idle_anon": idle["RssAnon"],
        "peak_anon": sampled.peak_anon,
        "at_peak": sampled.at_peak,
        "read": io1["read_bytes"] - io0["read_bytes"],
        "written": io1["write_bytes"] - io0["write_bytes"],
        "cancelled": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
    }
    if kind == "merge":
        result["out_bytes"] = weight_bytes(out)
        result["out_dtypes"] = sorted(_dtypes(out))
    return result


def _dtypes(folder: Path) -> set[str]:
    import struct

    found = set()
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scale", "--step", json.dumps(spec)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if done.returncode:
        return {"step": spec["step"], "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 2. the whole flow under DVC -------------------------------------------------------------------


class TreeSampler:
    """Peak summed RSS of a process and its descendants, and peak GPU memory used (nvidia-smi),
    sampled every `interval` seconds while running."""

    def __init__(self, pid: int, gpu: bool, interval: float = 0.25) -> None:
        self.pid, self.gpu, self.interval = pid, gpu and shutil.which("nvidia-smi"), interval
        self.peak_rss = self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[str]:
        children: dict[str, list[str]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(fields[1], []).append(stat.parent.name)
        tree, todo = [], [str(self.pid)]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval):
            rss = 0
            for pid in self._tree():
                try:
                    rss += proc_status("VmRSS", pid)
                except OSError:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            ticks += 1
            if self.gpu and ticks % 4 == 0:
                query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
                out = subprocess.run(query, capture_output=True, text=True).stdout
                used = sum(int(x) for x in out.split() if x.isdigit()) * 2**20
                self.peak_gpu = max(self.peak_gpu, used)


def measured(cmd: list[str], cwd: Path, gpu: bool) -> dict[str, Any]:
    """Run `cmd`; its wall time, sampled tree peaks, and the tree's read/written bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with subprocess.Popen(
        cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        with TreeSampler(proc.pid, gpu) as sampler:
            output, _ = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss": sampler.peak_rss,
        "gpu_peak": sampler.peak_gpu or None,
        # Linux: ru_inblock/ru_oublock are read_bytes/write_bytes ÷ 512 of reaped descendants
        "read": (after.ru_inblock - before.ru_inblock) * 512,
        "written": (after.ru_oublock - before.ru_oublock) * 512,
    }


def wrap(out: Path, cmd: list[str]) -> int:
    """Run the flow (the DVC stage's command) and record its own tree's traffic in `out`."""
    started = time.perf_counter()
    code = subprocess.run(cmd).returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.write_text(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - started, 1),
                "read": usage.ru_inblock * 512,
                "written": usage.ru_oublock * 512,
                "max_rss": usage.ru_maxrss * 1024,  # the largest single process
            }
        )
    )
    return code


def dvc_repo(root: Path, flow_cmd: list[str]) -> Path:
    """A DVC repo at `root` whose one stage runs the flow (outputs as dvc.yaml's evolve stage)
    with the project's DVC cache settings; returns the DVC executable."""
    import yaml

    dvc = Path(sys.executable).with_name("dvc")
    root.mkdir(parents=True)
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=root, check=True, env=child_env())
    project = configparser.ConfigParser()
    project.read(ROOT / ".dvc" / "config")
    for key, value in project["cache"].items() if project.has_section("cache") else []:
        cmd = [str(dvc), "config", f"cache.{key}", value.strip('"')]
        subprocess.run(cmd, cwd=root, check=True, env=child_env())
    wrapped = [sys.executable, "-m", "bench.scale", "--wrap", str(root / "flow.json"), "--"]
    stage = {
        "cmd": shlex.join([*wrapped, *flow_cmd]),
        "outs": [{"data/store": {"persist": True}}, {"data/state": {"persist": True}}],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evolve": stage}}))
    return dvc


def run_flow(
    root: Path, models: list[Path], tasks: Path, runtime: str, args: argparse.Namespace
) -> dict[str, Any]:
    overrides = flow_overrides(root, models, tasks, runtime, args.device, args.generations)
    overrides += args.override
    flow_cmd = [sys.executable, "-m", "flows.evolve", *overrides]
    gpu = args.device.startswith("cuda")
    out: dict[str, Any] = {"runtime": runtime, "command": shlex.join(flow_cmd)}
    wrapped = [sys.executable, "-m", "bench.scale", "--wrap", str(root / "flow.json"), "--"]
    if args.no_dvc:  # the flow alone, run and re-run (a machine without DVC installed)
        root.mkdir(parents=True)
        commands = {"run": [*wrapped, *flow_cmd], "rerun": [*wrapped, *flow_cmd]}
        cache = root / ".dvc" / "cache"  # absent: the disk figure is the store alone
    else:
        dvc = dvc_repo(root, flow_cmd)
        cache = Path(
            subprocess.run(
                [str(dvc), "cache", "dir"],
                cwd=root,
                capture_output=True,
                text=True,
                env=child_env(),
            ).stdout.strip()
            or root / ".dvc" / "cache"
        )
        commands = {
            "run": [str(dvc), "repro"],
            "rerun": [str(dvc), "repro", "-f"],
            # the stage's command alone, as docs/operations.md says to resume (no DVC copy)
            "direct": [*wrapped, *flow_cmd],
        }
    for label, cmd in commands.items():
        evict([root, *models])
        figures = measured(cmd, root, gpu)
        figures["flow"] = json.loads((root / "flow.json").read_text())
        figures["disk"] = disk_use(root / "data" / "store", cache)
        summary = json.loads((root / "results" / "greedy_kinship" / "summary.json").read_text())
        figures["steps"] = summary.get("steps", {})
        figures["counts"] = summary.get("counts", {})
        out[label] = figures
    return out


# -- 3. a Dask step bigger than RAM ÷ cores --------------------------------------------------------


def _allocate(nbytes: int, hold_s: float) -> int:
    import numpy as np

    block = np.ones(nbytes, dtype=np.uint8)  # ones, not zeros: every page is touched
    time.sleep(hold_s)
    return int(block[::4096].sum()) * 4096


def dask_alloc(timeout_s: float) -> dict[str, Any]:
    """One task that holds 1.1 × RAM ÷ cores on the default temporary cluster."""
    from distributed import Client

    from flows.run.cluster import dask_task_runner

    cfg = compose_typed(["runtime=dask"])
    # the task is plain Dask: no Prefect server is needed (without this one would be started)
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:9/api")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    nbytes = int(1.1 * total / os.cpu_count())
    available = proc_meminfo("MemAvailable")
    out: dict[str, Any] = {"bytes": nbytes, "ram": total, "cores": os.cpu_count()}
    if available < nbytes + 2 * 2**30:
        return {**out, "status": f"skipped: {available / 2**30:.1f} GiB available"}
    runner = dask_task_runner(cfg.runtime.dask)
    started = time.perf_counter()
    with runner.cluster_class(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        limits = {w["name"]: w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
        out["worker_memory_limits"] = limits
        future = client.submit(_allocate, nbytes, 3.0, pure=False)
        try:
            future.result(timeout=timeout_s)
            out["status"] = "completed"
        except Exception as exc:  # the figure is whether it completed, and why not
            out["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def proc_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


# -- printing --------------------------------------------------------------------------------------


def verdict(goal: str, value: float | None) -> str:
    if value is None:
        return ""
    limit, how = GOALS[goal]
    ok = abs(value - limit) <= 0.02 if how == "==" else value <= limit
    return f"goal {how.replace('==', '=')} {limit:g}x: {'met' if ok else 'NOT met'}"


def ratio(value: float | None, unit: float) -> str:
    return "-" if value is None else f"{value / unit:6.2f}x"


def print_steps(size: str, model: int, steps: list[dict[str, Any]], device: str) -> None:
    print(f"\n[{size}] steps alone (one model = {model / 1e6:.0f} MB of weights; ratios to it)")
    header = f"  {'step':12} {'wall s':>7} {'RSS-idle':>8} {'read':>8} {'written':>8} {'GPU GB':>7}"
    print(header)
    for s in steps:
        if "error" in s:
            print(f"  {s['step']:12} error: {s['error']}")
            continue
        extra = ""
        if s["step"] == "merge":
            # judged on the anonymous part: the rest is the parents' mapped file pages, page
            # cache that the kernel reclaims under pressure instead of failing the merge
            anon, file = s["peak_anon"] - s["idle_anon"], s["at_peak"]["RssFile"]
            extra = f"anon {anon / model:.2f}x (file pages at the peak {file / model:.2f}x) "
            extra += verdict("merge_rss", anon / model) + "; "
            written = verdict("merge_written", s["written"] / model).replace("goal", "written")
            extra += f"{written}; out {','.join(s['out_dtypes'])}"
        elif s["step"] == "evaluate" and device == "cpu":
            extra = verdict("evaluate_rss_cpu", (s["peak_rss"] - s["idle_rss"]) / model)
        gpu = f"{s['gpu_peak'] / 1e9:7.2f}" if s.get("gpu_peak") is not None else f"{'-':>7}"
        print(
            f"  {s['step']:12} {s['seconds']:7.1f} {ratio(s['peak_rss'] - s['idle_rss'], model)}"
            f"  {ratio(s['read'], model)}  {ratio(s['written'], model)} {gpu}  {extra}"
        )


def print_flow(size: str, model: int, flow: dict[str, Any]) -> None:
    print(f"\n[{size}] runtime={flow['runtime']}: the flow as a DVC stage")
    names = {
        "run": "dvc repro",
        "rerun": "dvc repro -f (re-run)",
        "direct": "then the stage's command alone (re-run)",
    }
    for label in [k for k in names if k in flow]:
        f = flow[label]
        store = f["disk"]["kept"] or 1
        name = names[label]
        gpu = f", GPU {f['gpu_peak'] / 1e9:.2f} GB" if f.get("gpu_peak") else ""
        print(
            f"  {name}: {f['seconds']:.1f} s (flow {f['flow']['seconds']:.1f} s), tree peak RSS "
            f"{f['peak_rss'] / 1e9:.2f} GB = {ratio(f['peak_rss'], model).strip()} a model "
            f"(servers and libraries included){gpu}"
        )
        read, written = ratio(f["read"], model), ratio(f["written"], model)
        flow_read, flow_written = (
            ratio(f["flow"]["read"], model),
            ratio(f["flow"]["written"], model),
        )
        print(
            f"    read {read.strip()} a model (flow {flow_read.strip()}), "
            f"written {written.strip()} (flow {flow_written.strip()})"
        )
        reads = {
            "rerun": [("dvc repro -f", f["read"]), ("flow alone", f["flow"]["read"])],
            "direct": [("the command alone", f["flow"]["read"])],
        }
        for who, read in reads.get(label, []):
            goal = verdict("rerun_read", read / store)
            print(f"    re-run read ÷ store, {who}: {read / store:.3f}  {goal}")
        use = f["disk"]["used"] / store
        print(
            f"    store + DVC cache on disk ÷ store: {use:.2f} ({f['disk']['used'] / 1e6:.0f} MB "
            f"for {store / 1e6:.0f} MB kept)  {verdict('disk', use)}"
        )
        steps = ", ".join(
            f"{k} {v['count']}× {v['seconds'] / max(v['count'], 1):.1f} s"
            for k, v in f["steps"].items()
        )
        print(f"    steps in the flow (mean wall): {steps or 'none ran'}")


def print_7b(
    size: str, model: int, steps: list[dict[str, Any]], flows: list[dict[str, Any]]
) -> None:
    scale = BYTES_7B / model
    by = {s["step"]: s for s in steps if "error" not in s}
    parts = []
    if "merge" in by:
        m = by["merge"]
        rss, written = (m["peak_rss"] - m["idle_rss"]) * scale, m["written"] * scale
        anon = (m["peak_anon"] - m["idle_anon"]) * scale
        parts.append(
            f"merge RSS {rss / 1e9:.1f} GB (anon {anon / 1e9:.1f} GB), "
            f"writes {written / 1e9:.1f} GB, "
            f"{m['seconds'] * scale / 60:.0f} min if linear"
        )
    if "evaluate" in by:
        e = by["evaluate"]
        parts.append(f"evaluate RSS {(e['peak_rss'] - e['idle_rss']) * scale / 1e9:.1f} GB")
    if "kinship" in by:
        parts.append(f"kinship reads {by['kinship']['read'] * scale / 1e9:.0f} GB")
    for flow in flows:
        r = flow["rerun"]
        store = r["disk"]["kept"] or 1
        direct = flow.get("direct", r)["flow"]["read"] / store
        parts.append(
            f"{flow['runtime']}: store+cache {r['disk']['used'] / store:.2f}x of kept, "
            f"re-run reads {r['read'] / store:.3f}x of the store by dvc repro -f, "
            f"{direct:.3f}x by the command alone"
        )
    print(f"\n[{size} -> 7B, 14.5 GB bf16, scaled by bytes ×{scale:.0f}] " + "; ".join(parts))


# -- driver ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="60M", help="comma-separated, from " + "/".join(SIZE_NAMES))
    p.add_argument("--runtime", default="local,dask", help="local, dask or both")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--generations", type=int, default=1)
    p.add_argument("--docs", type=int, default=12, help="documents of the local task")
    p.add_argument("--threads", type=int, default=0, help="torch threads of a step alone (0: all)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new dir in /var/tmp")
    p.add_argument("--keep", action="store_true", help="keep the workdir (models are reused)")
    p.add_argument("--skip-alloc", action="store_true", help="skip the synthetic Dask step")
    p.add_argument(
        "--no-dvc", action="store_true", help="run the flow directly, not as a DVC stage"
    )
    p.add_argument("--steps-only", action="store_true", help="each step alone; no whole flow")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every run (repeatable), e.g. tracking.enabled=false",
    )
    p.add_argument("--alloc-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.runtime = [r.strip() for r in args.runtime.split(",") if r.strip()]
    bad = [s for s in args.sizes if s not in SIZE_NAMES]
    if bad or not args.sizes:
        p.exit(2, f"error: --sizes: unknown {bad}; choose from {', '.join(SIZE_NAMES)}\n")
    if not args.runtime or set(args.runtime) - {"local", "dask"}:
        p.exit(2, "error: --runtime: local, dask or local,dask\n")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.exit(2, "error: --device: cpu or cuda\n")
    if args.generations < 1:
        p.exit(2, "error: --generations: at least 1\n")
    return args


SIZE_NAMES = ("30M", "60M", "250M", "1B")  # bench/families.py SCALE_SHAPES, 7B left out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--step"]:
        print(json.dumps(measure_step(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--wrap"]:
        return wrap(Path(argv[1]), argv[3:])
    if argv[:1] == ["--sample"]:
        sample(argv[1], float(argv[2]))
        return 0
    if argv[:1] == ["--alloc"]:
        print(json.dumps(dask_alloc(float(argv[1]))))
        return 0
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scale-bench-", dir="/var/tmp"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if fs_type(workdir) == "tmpfs":
        print(f"warning: {workdir} is on tmpfs: read_bytes/write_bytes count nothing there")
    print(f"scale bench in {workdir}: sizes {args.sizes}, runtimes {args.runtime}, {args.device}")
    threads = args.threads or os.cpu_count() or 1
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    try:
        tasks = write_task(workdir / "task", args.docs)
        for size in args.sizes:
            models = build_family(size, workdir / "models" / size)
            model = weight_bytes(models[0])
            step_root = workdir / "steps" / size
            step_root.mkdir(parents=True, exist_ok=True)
            overrides = flow_overrides(step_root, models, tasks, "local", args.device, 1)
            overrides += args.override
            steps = []
            for kind in ("fetch_first", "fetch_again", "kinship", "merge", "evaluate"):
                spec = {
                    "step": kind,
                    "overrides": overrides,
                    "models": [str(m) for m in models],
                    "threads": threads,
                    "scratch": str(step_root),
                }
                steps.append(run_step(spec))
            print_steps(size, model, steps, args.device)
            flows = []
            for runtime in [] if args.steps_only else args.runtime:
                root = workdir / "runs" / f"{size}-{runtime}"
                shutil.rmtree(root, ignore_errors=True)
                flows.append(run_flow(root, models, tasks, runtime, args))
                print_flow(size, model, flows[-1])
            print_7b(size, model, steps, flows)
            results["sizes"][size] = {"model_bytes": model, "steps": steps, "flows": flows}
        if not args.skip_alloc:
            cmd = [sys.executable, "-m", "bench.scale", "--alloc", str(args.alloc_timeout)]
            done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            alloc = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"status": f"error: {done.stderr.strip()[-300:]}"}
            )
            results["dask_alloc"] = alloc
            limits = alloc.get("worker_memory_limits", {}).values()
            shown = ", ".join(f"{v / 2**30:.1f} GiB" if v else "none" for v in limits) or "?"
            after = f" after {alloc['seconds']} s" if "seconds" in alloc else ""
            print(
                f"\nDask step holding {alloc.get('bytes', 0) / 2**30:.1f} GiB (1.1 × RAM ÷ cores) "
                f"on the default temporary cluster (worker limits {shown}): "
                f"{alloc['status']}{after}"
            )
        (workdir / "scale.json").write_text(json.dumps(results, indent=1))
        print(f"\nfigures: {workdir / 'scale.json'}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
