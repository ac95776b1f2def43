"""The real flow end to end on the micro zoo: Prefect, mergekit, lm-eval, MLflow, all real.

The shared greedy_kinship run (conftest) searches on the zoo's tasks and scores its top 3 on a
final benchmark of stand-in tasks, one of them a generation task whose samples are logged."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import FINAL_TOP_K, ROOT, evolve_command, run_evolve
from tests.stand_ins import check_generation_samples, read_jsonl

pytestmark = pytest.mark.slow


def _summary(root: Path, run_name: str) -> dict:
    return json.loads((root / "results" / run_name / "summary.json").read_text())


def _rows(root: Path, run_name: str) -> list[dict[str, str]]:
    with (root / "results" / run_name / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _mlflow_runs(root: Path, experiment: str):
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _children(root: Path, run_name: str) -> dict:
    """The model runs of parent run `run_name`, by model name."""
    runs = _mlflow_runs(root, _summary(root, run_name)["experiment"])
    parent = next(
        r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == run_name
    )
    return {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }


def _artifact(root: Path, run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(_client(root).download_artifacts(run_id, path, str(dst)))


def test_greedy_kinship_runs_algorithm_1_end_to_end(
    evolve_root: Path, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-4000:]
    summary = _summary(evolve_root, "greedy_kinship")
    rows = _rows(evolve_root, "greedy_kinship")
    n_found = sum(r["role"] == "foundation" for r in rows)
    gen1 = [r for r in rows if r["gen"] == "1"]
    assert len(gen1) == n_found * (n_found - 1) // 2  # every pair of foundation models
    assert summary["generations"] >= 2
    gen2 = [r for r in rows if r["gen"] == "2"]
    assert [r["model"] for r in gen2 if r["role"] == "exploration"] == ["model-2-exp"]
    for r in rows:
        assert 0.0 <= float(r["avg"]) <= 1.0
        if r["role"] != "foundation":
            assert r["gain"] != "" and r["pcc"] != "" and r["cs"] != "" and r["ed"] != ""
            merged = Path(evolve_root / "data" / "store")
            assert any(merged.iterdir())
    # the printed Table 2-like table, without transformers' deprecation notice for mergekit's call
    assert "model-2-exp" in kinship_run.stdout and "stopped:" in kinship_run.stdout
    assert "torch_dtype" not in kinship_run.stdout + kinship_run.stderr
    # the mergekit YAML of each merge sits in the merged folder
    configs = list((evolve_root / "data" / "store").glob("*/mergekit_config.yml"))
    assert len(configs) == len(rows) - n_found
    # MLflow: one parent run, one child run per model
    runs = _mlflow_runs(evolve_root, summary["experiment"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in children) == sorted(r["model"] for r in rows)
    exp_child = next(r for r in children if r.info.run_name == "model-2-exp")
    assert exp_child.data.params["role"] == "exploration"
    assert {"avg", "gain", "kinship_pcc", "kinship_cs", "kinship_ed"} <= set(exp_child.data.metrics)


def test_final_benchmark_scores_the_top_k_on_its_own_suite(
    evolve_root: Path, kinship_run: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-4000:]
    summary = _summary(evolve_root, "greedy_kinship")
    rows = _rows(evolve_root, "greedy_kinship")
    # exactly the top k by search avg (Algorithm 1's order: avg, then generation, then name)
    ranked = sorted(rows, key=lambda r: (-float(r["avg"]), int(r["gen"]), r["model"]))
    top = [r["model"] for r in ranked[:FINAL_TOP_K]]
    final = summary["final_scores"]
    assert sorted(final, key=lambda name: final[name]["rank"]) == top
    search = {r["model"]: float(r["avg"]) for r in rows}
    for name, entry in final.items():
        # scored on the final suite, not the search's zoo tasks
        assert set(entry["scores"]) == {"sg_gen", "sg_mc"}
        assert entry["avg"] == pytest.approx(sum(entry["scores"].values()) / 2)
        assert entry["search_avg"] == pytest.approx(search[name], abs=1e-4)
    best = max(final, key=lambda name: final[name]["avg"])
    assert summary["final_best_model"] == best
    # final_scores.csv in rank order, and a line per model on the console
    with (evolve_root / "results" / "greedy_kinship" / "final_scores.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["model"] for r in table] == top
    assert [float(r["final_avg"]) for r in table] == [
        pytest.approx(final[n]["avg"], abs=1e-4) for n in top
    ]
    assert f"final benchmark (sg_gen, sg_mc) of the top {FINAL_TOP_K}" in kinship_run.stdout
    assert f"final benchmark: best {best}" in kinship_run.stdout
    # MLflow: final/<task> and final/avg on those models' runs only; the generation task's
    # samples as an artifact that explains its score; the zoo's multiple-choice search tasks
    # keep none (log_samples: auto)
    children = _children(evolve_root, "greedy_kinship")
    client = _client(evolve_root)
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.data.params["final_eval_tasks"] == '["sg_gen", "sg_mc"]'
    assert parent.data.params["final_eval_top_k"] == str(FINAL_TOP_K)
    for name, run in children.items():
        metrics = run.data.metrics
        assert client.list_artifacts(run.info.run_id, "samples") == []
        if name not in final:
            assert not any(k.startswith("final/") for k in metrics), name
            continue
        assert metrics["final/avg"] == pytest.approx(final[name]["avg"])
        for task, value in final[name]["scores"].items():
            assert metrics[f"final/{task}"] == pytest.approx(value)
        logged = [a.path for a in client.list_artifacts(run.info.run_id, "final/samples")]
        assert logged == ["final/samples/sg_gen.jsonl"]
        path = _artifact(evolve_root, run.info.run_id, logged[0], tmp_path / name)
        check_generation_samples(read_jsonl(path), final[name]["scores"]["sg_gen"], n_docs=12)


# `python -m flows.evolve ARGS` with the two whole-model reads of a run observed: hashing a
# model's weights (tasks.core.store.hash_weights) and scanning them for NaN/Inf
# (tasks.fetch.check_finite); each call's folder and bytes go to the JSON file $READS_LOG
COUNT_READS = """
import json, os, runpy, sys
from collections.abc import Callable
from pathlib import Path
import tasks.core.store as store, tasks.fetch as fetch
reads, hash_weights, check_finite = [], store.hash_weights, fetch.check_finite
def size(folder):
    return sum(p.stat().st_size for p in store.weight_files(Path(folder)))
def hashed(model_dir, *args, **kwargs):
    reads.append(["hash", str(model_dir), size(model_dir)])
    return hash_weights(model_dir, *args, **kwargs)
def scanned(model, *args, **kwargs):
    reads.append(["finite", model.path, size(model.path)])
    return check_finite(model, *args, **kwargs)
store.hash_weights, fetch.check_finite = hashed, scanned
sys.argv = ["flows/evolve.py", *sys.argv[1:]]
try:
    runpy.run_module("flows.evolve", run_name="__main__")
finally:
    Path(os.environ["READS_LOG"]).write_text(json.dumps(reads))
"""


def run_counting_reads(
    root: Path, zoo: Path, *overrides: str, log: Path
) -> tuple[subprocess.CompletedProcess[str], list[list]]:
    """run_evolve through COUNT_READS: the run, and the whole-model reads it made."""
    cmd = evolve_command(root, zoo, *overrides)
    cmd[1:3] = ["-c", COUNT_READS]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "READS_LOG": str(log)},
    )
    return result, json.loads(log.read_text()) if log.is_file() else []


def _store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data" / "store").glob("*/*.safetensors"))


def test_rerun_redoes_no_merge_or_evaluation(
    evolve_root: Path,
    micro_zoo: Path,
    kinship_run: subprocess.CompletedProcess[str],
    kinship_overrides: list[str],
    tmp_path: Path,
) -> None:
    """...and re-reads no model. The same command again is up to date (flows/run/uptodate.py):
    it prints the finished run's table and writes nothing. Replayed (runtime.replay=true), every
    step comes from the store or Prefect's cache: every reused store entry and every foundation
    is trusted by its stat key (store.verify=stat) and its NaN/Inf scan is remembered
    (data/state/finite.json)."""
    assert kinship_run.returncode == 0
    first = _rows(evolve_root, "greedy_kinship")
    final = _summary(evolve_root, "greedy_kinship")["final_scores"]
    written = evolve_root / "results" / "greedy_kinship" / "summary.json"
    before = written.read_bytes()
    same, reads = run_counting_reads(
        evolve_root, micro_zoo, *kinship_overrides, log=tmp_path / "same.json"
    )
    assert same.returncode == 0, same.stderr[-4000:]
    assert same.stdout.startswith("up to date: "), same.stdout[:2000]
    assert "model-2-exp" in same.stdout and "stopped:" in same.stdout
    assert reads == [] and written.read_bytes() == before
    experiment = _summary(evolve_root, "greedy_kinship")["experiment"]
    assert len(_mlflow_runs(evolve_root, experiment)) == 1 + len(first)  # none logged again

    again, reads = run_counting_reads(
        evolve_root, micro_zoo, *kinship_overrides, "runtime.replay=true", log=tmp_path / "r.json"
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "up to date" not in again.stdout and "generation 1 resumed" in again.stdout
    assert reads == [], reads  # under 5% of the store's bytes: none at all
    assert _store_bytes(evolve_root) > 0
    summary = _summary(evolve_root, "greedy_kinship")
    counts = summary["counts"]
    assert counts["merges"] > 0 and counts["merges_reused"] == counts["merges"]
    assert counts["evals"] > 0 and counts["evals_cached"] == counts["evals"]
    assert _rows(evolve_root, "greedy_kinship") == first
    # the final benchmark's evaluations are reused too
    assert counts["final_evals"] == counts["final_evals_cached"] == FINAL_TOP_K
    assert summary["final_scores"] == final
    runs = _mlflow_runs(evolve_root, _summary(evolve_root, "greedy_kinship")["experiment"])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len(runs) == 1 + len(first)


def test_up_to_date_is_only_a_run_with_nothing_to_do(
    evolve_root: Path,
    micro_zoo: Path,
    stand_ins: Path,
    kinship_run: subprocess.CompletedProcess[str],
    kinship_overrides: list[str],
) -> None:
    """The finished run is recognised (flows/run/uptodate.py) only while its config, paths,
    model folders, benchmark files and outputs are those it recorded; each change is undone
    after, so the same run is recognised again."""
    from flows.run.schema import typed_config
    from flows.run.uptodate import finished_run
    from tests.conftest import compose_config

    assert kinship_run.returncode == 0

    def finished(*extra: str) -> dict | None:
        overrides = [*evolve_command(evolve_root, micro_zoo, *kinship_overrides)[3:], *extra]
        return finished_run(typed_config(compose_config(*overrides)))

    def undone(path: Path) -> Callable[[], object]:
        """What puts back the bytes, mtime and inode `path` has now."""
        st, data = path.stat(), path.read_bytes()
        return lambda: (path.write_bytes(data), os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns)))

    assert finished() is not None
    assert finished()["best_model"] == _summary(evolve_root, "greedy_kinship")["best_model"]
    for other in ("runtime.replay=true", "store.verify=full", "seed=1", "merge.parameters.t=0.3"):
        assert finished(other) is None, other
    assert finished("runtime=dask", "runtime.max_workers=1") is not None  # how, not what
    weights = sorted((evolve_root / "data" / "store").glob("*/*.safetensors"))[0]
    task_file = sorted(p for p in stand_ins.iterdir() if p.is_file())[0]
    plot = evolve_root / "results" / "greedy_kinship" / "plots" / "family_tree.png"
    for path, change in (
        (weights, lambda p: os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))),
        (task_file, lambda p: p.write_bytes(p.read_bytes() + b"\n")),
        (plot, lambda p: p.unlink()),
    ):
        restore = undone(path)
        change(path)
        assert finished() is None, path
        restore()
        assert finished() is not None, path


def test_a_changed_store_file_is_rehashed_and_its_entry_rebuilt(
    evolve_root: Path,
    micro_zoo: Path,
    kinship_run: subprocess.CompletedProcess[str],
    kinship_overrides: list[str],
    tmp_path: Path,
) -> None:
    """A weight file rewritten in place (same size, new mtime) changes its entry's stat key: that
    entry alone is re-hashed, fails verification and is merged again, byte for byte."""
    assert kinship_run.returncode == 0
    weights = sorted((evolve_root / "data" / "store").glob("*/*.safetensors"))
    target = weights[0]
    good = target.read_bytes()
    with target.open("r+b") as fh:  # flip bits in the last tensor, keeping size and name
        fh.seek(-10, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in good[-10:]))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again, reads = run_counting_reads(
        evolve_root, micro_zoo, *kinship_overrides, log=tmp_path / "reads.json"
    )
    assert again.returncode == 0, again.stderr[-4000:]
    # the rebuilt merge's own fingerprint (its partial folder) is a hash of new bytes, not a read
    rereads = [r[:2] for r in reads if not Path(r[1]).name.startswith(".partial-")]
    assert rereads == [["hash", str(target.parent)]], reads
    assert "store entry failed verification and was rebuilt" in again.stdout
    counts = _summary(evolve_root, "greedy_kinship")["counts"]
    assert counts["merges_reused"] == counts["merges"] - 1
    assert target.read_bytes() == good


def test_greedy_experiment_has_no_exploration_and_shares_the_mlflow_experiment(
    evolve_root: Path,
    micro_zoo: Path,
    kinship_run: subprocess.CompletedProcess[str],
    tmp_path: Path,
) -> None:
    """Also: samples of every task (eval.log_samples=true). Every evaluation this run needs that
    greedy_kinship made was cached without samples (its zoo tasks are multiple choice): the
    sample log is no part of the cache key, so such a result is evaluated again, not served
    without the samples asked for."""
    canary = "hf_canary_do_not_log_7f3a9c"
    result = run_evolve(
        evolve_root,
        micro_zoo,
        "+experiment=greedy",
        "eval.log_samples=true",
        env={"HF_TOKEN": canary},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # the token reaches no param, tag, log, artifact or cached result
    assert canary not in result.stdout + result.stderr
    for path in evolve_root.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    rows = _rows(evolve_root, "greedy")
    assert rows and all(r["role"] != "exploration" for r in rows)
    runs = _mlflow_runs(evolve_root, _summary(evolve_root, "greedy")["experiment"])
    parents = {r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {"greedy", "greedy_kinship"}

    counts = _summary(evolve_root, "greedy")["counts"]
    kinship_models = {r["fingerprint"] for r in _rows(evolve_root, "greedy_kinship")}
    cached_before = [r for r in rows if r["fingerprint"] in kinship_models]
    assert cached_before  # the foundations at least
    assert counts["evals_resampled"] == len(cached_before)
    assert counts["evals_cached"] == 0 and counts["evals"] == len(rows)
    children = _children(evolve_root, "greedy")
    tasks = sorted(k.removeprefix("score_") for k in rows[0] if k.startswith("score_"))
    for row in rows:
        run_id = children[row["model"]].info.run_id
        logged = [a.path for a in _client(evolve_root).list_artifacts(run_id, "samples")]
        assert logged == [f"samples/{task}.jsonl" for task in tasks]
        for task in tasks:  # per-sample acc explains each multiple-choice score too
            dst = tmp_path / row["model"]
            records = read_jsonl(_artifact(evolve_root, run_id, f"samples/{task}.jsonl", dst))
            assert len({r["doc_id"] for r in records}) == len(records) > 0
            mean = sum(r["metrics"]["acc,none"] for r in records) / len(records)
            assert mean == pytest.approx(float(row[f"score_{task}"]), abs=1e-4)


def test_bad_config_fails_before_any_work(micro_zoo: Path, tmp_path: Path) -> None:
    result = run_evolve(tmp_path, micro_zoo, "+experiment=greedy", "strategy.k=1")
    assert result.returncode != 0
    assert "strategy.k" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


def test_two_processes_share_one_store_and_mlflow_db(micro_zoo: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            evolve_command(tmp_path, micro_zoo, f"+experiment={name}"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("greedy", "greedy_kinship")
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    store = tmp_path / "data" / "store"
    entries = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert not [p for p in store.iterdir() if p.name.startswith(".partial-")]
    # every entry is complete and verified; merges both runs asked for exist once
    from tasks.core.store import verify_model

    assert entries and all(verify_model(p) for p in entries)
    needed = {
        r["fingerprint"]
        for name in ("greedy", "greedy_kinship")
        for r in _rows(tmp_path, name)
        if r["role"] != "foundation"
    }
    assert len(entries) == len(needed)
    runs = _mlflow_runs(tmp_path, "zoo-evolution")
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags) == [
        "greedy",
        "greedy_kinship",
    ]
