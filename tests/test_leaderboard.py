"""The Open LLM Leaderboard v2 suite (eval=open_llm_v2, issue 19): the leaderboard's
normalisation against hand-computed values (pure functions: no model), the suite as config
(composes, validates, its settings match lm-eval's leaderboard configs) and, where IFEval's or
MATH's packages are missing, one line naming them, exit 2, before any model. The whole suite
needs the hub's data: only its stand-ins (tests/stand_ins.py) run here, through lm-eval.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.run.inputs import evaluation_settings
from flows.run.schema import validate
from tasks.core.errors import InputError
from tasks.evaluate import entry_scores_of, evaluate_model
from tasks.lmeval import check_tasks, task_entries
from tasks.scoring.leaderboard import entry_scores, rescale
from tests.conftest import compose_config, run_evolve, spy_simple_evaluate

LEADERBOARD = Path(__import__("lm_eval").__file__).parent / "tasks" / "leaderboard"
PACKAGES = ("langdetect", "immutabledict", "nltk", "math_verify", "sympy")  # IFEval's, MATH's
MISSING = [m for m in PACKAGES if importlib.util.find_spec(m) is None]


# -- the normalisation, by hand ------------------------------------------------------------------


def test_a_multiple_choice_score_is_rescaled_from_its_random_baseline() -> None:
    # MMLU-Pro, 10 choices: (0.1861 - 0.1) / 0.9
    assert rescale(0.1861, 10) == pytest.approx(0.0861 / 0.9)
    assert rescale(0.1861, 10) == pytest.approx(0.095667, abs=1e-6)
    # GPQA, 4 choices: the leaderboard's own example, 0.6 -> 46.67
    assert 100 * rescale(0.6, 4) == pytest.approx(46.67, abs=0.005)
    assert rescale(0.25, 4) == 0.0  # chance is 0
    assert rescale(0.1, 4) == 0.0  # below chance: 0, not negative
    assert rescale(1.0, 4) == 1.0


def test_bbh_style_subtasks_are_rescaled_each_then_averaged() -> None:
    """Each subtask from its own baseline, then the plain mean (not lm-eval's group value)."""
    reported = {
        "musr": {"acc_norm,none": 0.55},  # lm-eval's size-weighted aggregate: the raw score
        "murder_mysteries": {"acc_norm,none": 0.7},  # 2 choices: (0.7 - 1/2) / (1/2) = 0.4
        "object_placements": {"acc_norm,none": 0.4},  # 5: (0.4 - 0.2) / 0.8 = 0.25
        "team_allocation": {"acc_norm,none": 0.6},  # 3: (0.6 - 1/3) / (2/3) = 0.4
        "web_of_lies": {"acc_norm,none": 0.3},  # 2, below chance: 0
    }
    choices = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}
    score, raw = entry_scores("musr", ["acc_norm,none"], choices, reported)
    assert score == pytest.approx((0.4 + 0.25 + 0.4) / 3) and raw == 0.55
    score, _ = entry_scores("musr", ["acc_norm,none"], {**choices, "web_of_lies": 2}, reported)
    assert score == pytest.approx((0.4 + 0.25 + 0.4 + 0.0) / 4)


def test_a_generative_score_has_baseline_zero() -> None:
    """MATH and IFEval: nothing to guess, so the score is unchanged (floored at 0); IFEval's is
    the mean of its prompt- and instruction-level strict accuracy, as the leaderboard showed it
    (Llama-2-7b-hf: 0.18484 and 0.31894 -> 25.19 on the leaderboard)."""
    assert rescale(0.0121, 0) == 0.0121 and rescale(0.0, 0) == 0.0
    keys = ["prompt_level_strict_acc,none", "inst_level_strict_acc,none"]
    reported = {"ifeval": dict(zip(keys, [0.18484288, 0.31894484], strict=True))}
    score, raw = entry_scores("ifeval", keys, 0, reported)
    assert score == raw and 100 * score == pytest.approx(25.19, abs=0.005)


def test_scores_keep_the_raw_value_beside_the_normalised_one() -> None:
    entries = task_entries(
        [{"task": "mc", "choices": 4}, "plain", {"task": "gen", "metric": "em", "choices": 0}]
    )
    reported = {"mc": {"acc,none": 0.5}, "plain": {"acc,none": 0.3}, "gen": {"em,none": 0.2}}
    metrics = {"mc": "acc,none", "plain": "acc,none", "gen": ["em,none"]}
    scores = entry_scores_of(entries, metrics, reported)
    assert scores == pytest.approx(
        {"mc": 1 / 3, "mc/raw": 0.5, "plain": 0.3, "gen": 0.2, "gen/raw": 0.2}
    )


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        (1, "2 or more"),
        (-3, "2 or more"),
        (2.5, "2 or more"),
        (True, "2 or more"),
        ({}, "subtask -> number of choices"),
        ({"a": 1}, r"choices\.a: a number of answer choices"),
    ],
)
def test_choices_are_checked(choices: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        task_entries([{"task": "t", "choices": choices}])


def test_a_metric_list_holds_metric_names() -> None:
    assert task_entries([{"task": "t", "metric": ["a", "b,f"]}])[0]["metric"] == ["a", "b,f"]
    with pytest.raises(InputError, match=r"eval.tasks\[0\].metric: a metric name"):
        task_entries([{"task": "t", "metric": ["acc", 3]}])


# -- through lm-eval, on stand-ins of the leaderboard's shapes ----------------------------------


def test_normalised_scores_come_from_lm_evals_own_values(
    stand_ins: Path, micro_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_simple_evaluate(monkeypatch)
    entries = [
        {"task": "sg_mc", "metric": ["acc", "acc_norm"], "choices": 4},
        {"task": "sg_group", "metric": "acc", "choices": {"sg_a": 2, "sg_b": 3}},
        {"task": "sg_gen", "metric": "exact_match,strict-match", "choices": 0},
        {"task": "sg_shots", "metric": "acc"},
    ]
    result = evaluate_model(micro_zoo / "add", entries, stand_ins, batch_size=16)
    out = seen["out"]
    got = {**out.get("groups", {}), **out["results"]}
    mc = (got["sg_mc"]["acc,none"] + got["sg_mc"]["acc_norm,none"]) / 2
    a, b = got["sg_a"]["acc,none"], got["sg_b"]["acc,none"]
    gen = got["sg_gen"]["exact_match,strict-match"]
    assert result["scores"] == pytest.approx(
        {
            "sg_mc": max((mc - 0.25) / 0.75, 0.0),
            "sg_mc/raw": mc,
            "sg_group": (max((a - 1 / 2) / (1 / 2), 0.0) + max((b - 1 / 3) / (2 / 3), 0.0)) / 2,
            "sg_group/raw": got["sg_group"]["acc,none"],
            "sg_gen": gen,
            "sg_gen/raw": gen,
            "sg_shots": got["sg_shots"]["acc,none"],
        }
    )
    entry_names = ["sg_mc", "sg_group", "sg_gen", "sg_shots"]
    assert result["avg"] == pytest.approx(sum(result["scores"][n] for n in entry_names) / 4)
    with pytest.raises(InputError, match="'sg_group'.choices must give each of its 2 tasks"):
        check_tasks([{"task": "sg_group", "metric": "acc", "choices": {"sg_a": 2}}], stand_ins)
    with pytest.raises(InputError, match="'choices' per subtask needs a group"):
        check_tasks([{"task": "sg_mc", "choices": {"sg_a": 2}}], stand_ins)


# -- the suite as config -------------------------------------------------------------------------


def _entries(name: str) -> list[dict[str, Any]]:
    overrides = ("+experiment=greedy_kinship", f"eval={name}", f"final_eval={name}")
    cfg = validate(compose_config(*overrides))
    tasks = evaluation_settings(cfg, None)["tasks"]
    assert evaluation_settings(cfg, None, "final_eval")["tasks"] == tasks
    return tasks


def _literal_choices(path: Path) -> int | None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda *_: None)  # `!function`s: not needed here
    listed = yaml.load(path.read_text(), Loader).get("doc_to_choice")
    return len(listed) if isinstance(listed, list) else None


def test_the_v2_suites_compose_with_the_leaderboards_settings() -> None:
    full, tiny = _entries("open_llm_v2"), _entries("open_llm_v2_tiny")
    shots = {t["task"]: (t["num_fewshot"], t["metric"]) for t in full}
    assert shots == {
        "leaderboard_mmlu_pro": (5, "acc"),
        "leaderboard_bbh": (3, "acc_norm"),
        "leaderboard_gpqa": (0, "acc_norm"),
        "leaderboard_math_hard": (4, "exact_match"),
        "leaderboard_ifeval": (0, ["prompt_level_strict_acc", "inst_level_strict_acc"]),
        "leaderboard_musr": (0, "acc_norm"),
    }
    assert all(t["limit"] is None for t in full) and all(t["limit"] for t in tiny)
    assert [{**t, "limit": None} for t in tiny] == full  # the same suite, fewer documents
    choices = {t["task"]: t["choices"] for t in full}
    assert choices["leaderboard_mmlu_pro"] == 10 and choices["leaderboard_gpqa"] == 4
    assert choices["leaderboard_math_hard"] == choices["leaderboard_ifeval"] == 0
    # BBH's k are those of lm-eval's own configs (the leaderboard's table agrees)
    for path in (LEADERBOARD / "bbh_mc").glob("*.yaml"):
        task = f"leaderboard_bbh_{path.stem}"
        if not path.stem.startswith("_"):
            assert choices["leaderboard_bbh"][task] == _literal_choices(path), task
    assert len(choices["leaderboard_bbh"]) == 24
    assert choices["leaderboard_musr"] == {
        "leaderboard_musr_murder_mysteries": 2,
        "leaderboard_musr_object_placements": 5,
        "leaderboard_musr_team_allocation": 3,
    }
    # every shot count and metric is the one lm-eval's leaderboard configs set themselves
    assert "num_fewshot: 5" in (LEADERBOARD / "mmlu_pro" / "mmlu_pro.yaml").read_text()
    assert "num_fewshot: 3" in (LEADERBOARD / "bbh_mc" / "_fewshot_template_yaml").read_text()
    assert "num_fewshot: 4" in (LEADERBOARD / "math" / "_template_yaml").read_text()


def test_the_v2_suite_resolves_or_names_its_missing_packages() -> None:
    """Every task, subtask map and metric resolves from lm-eval's configs (no dataset); where
    IFEval's or MATH's packages are missing, one error names them all, with lm-eval's extra."""
    tasks = _entries("open_llm_v2")
    if not MISSING:
        check_tasks(tasks, None)
        return
    with pytest.raises(InputError) as caught:
        check_tasks(tasks, None)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("eval.tasks: task '")
    if {"langdetect", "immutabledict", "nltk"} & set(MISSING):
        assert "'leaderboard_ifeval' cannot be loaded" in message
        assert 'pip install "lm_eval[ifeval]"' in message
    if {"math_verify", "sympy"} & set(MISSING):
        assert "'leaderboard_math_hard' cannot be loaded" in message and "lm-eval[math]" in message


@pytest.mark.skipif(not MISSING, reason="IFEval's and MATH's packages are installed here")
def test_the_cli_stops_on_a_missing_package_before_any_model(tmp_path: Path) -> None:
    root = tmp_path / "run"
    result = run_evolve(root, tmp_path / "zoo", "+experiment=greedy_kinship", "eval=open_llm_v2")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: eval.tasks: task 'leaderboard_"), result.stderr
    assert "langdetect" in result.stderr or "math-verify" in result.stderr, result.stderr
    assert not (tmp_path / "zoo").exists()  # stopped before the zoo was built
