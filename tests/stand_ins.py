"""Local stand-ins for the Open LLM Leaderboard's task shapes (issue 10), on a few items in the
micro zoo's prompt format: multiple choice scored by acc_norm, generation scored by exact_match
through a regex filter (GSM8K's strict-match), a group with an aggregate, a task with its own
few-shot count. Shared by the evaluation tests and the flow run that evaluates a final suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# -- stand-in tasks ------------------------------------------------------------------------------

ITEMS = [(a, b) for a in range(1, 9) for b in (2, 5)][:12]


def _mc_rows() -> list[dict[str, Any]]:
    rows = []
    for a, b in ITEMS:
        right, wrong = str(a + b), str(a + b + 3)
        choices = [right, wrong] if a % 2 else [wrong, right]
        rows.append({"prompt": f"add {a}+{b}=", "choices": choices, "label": choices.index(right)})
    return rows


def _gen_rows() -> list[dict[str, Any]]:
    return [{"prompt": f"add {a}+{b}=", "answer": str(a + b)} for a, b in ITEMS]


def _mc_task(name: str, data: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": "mc.jsonl", "test": data}},
        "training_split": "train",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "fewshot_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
        **extra,
    }


def _gen_task() -> dict[str, Any]:
    """GSM8K's shape: generate, then a strict regex filter and a flexible one."""
    return {
        "task": "sg_gen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "gen.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [" ", "="], "max_gen_toks": 3, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": "^([0-9]+)$"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "regex_pattern": "([0-9]+)", "group_select": -1},
                    {"function": "take_first"},
                ],
            },
        ],
        "metadata": {"version": 1.0},
    }


def write_stand_ins(folder: Path) -> Path:
    """Task YAMLs and JSONL data in `folder`, written as tasks/zoo/build.py writes the zoo's."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = _mc_rows()
    for file, data in {"mc.jsonl": rows, "mc_a.jsonl": rows[:5], "mc_b.jsonl": rows[5:]}.items():
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in data))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _gen_rows()))
    configs = {
        "sg_mc": _mc_task("sg_mc", "mc.jsonl"),
        "sg_shots": _mc_task("sg_shots", "mc.jsonl", num_fewshot=0),
        "sg_a": _mc_task("sg_a", "mc_a.jsonl"),
        "sg_b": _mc_task("sg_b", "mc_b.jsonl"),
        "sg_gen": _gen_task(),
        "sg_group": {
            "group": "sg_group",
            "task": ["sg_a", "sg_b"],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 1.0},
        },
        "sg_bare_group": {"group": "sg_bare_group", "task": ["sg_a", "sg_b"]},
    }
    for name, cfg in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_generation_samples(records: list[dict[str, Any]], score: float, n_docs: int) -> None:
    """The sample log of sg_gen (exact_match through strict-match) explains its score: one
    record per evaluated document, each one's exact match is its filtered answer against its
    target, and their mean is the task's score."""
    assert len(records) == n_docs
    assert len({r["doc_id"] for r in records}) == n_docs
    for r in records:
        assert isinstance(r["prompt"], str) and r["prompt"].startswith("add ")
        assert set(r["filtered"]) == {"strict-match", "flexible-extract"}
        assert isinstance(r["responses"], str)  # what the model wrote, before any filter
        strict = r["metrics"]["exact_match,strict-match"]
        assert strict == float(r["filtered"]["strict-match"] == r["target"]), r
    mean = sum(r["metrics"]["exact_match,strict-match"] for r in records) / len(records)
    assert abs(mean - score) < 1e-9, (mean, score)
