"""Per-task evaluation settings (issue 10): each eval.tasks entry has its own few-shot count,
metric (with filter) and limit; every task's config resolves before any model is loaded; the
Open LLM Leaderboard v1 suites are data in conf/eval; the lm-eval options enter the evaluation
cache key only when they change scores; per-sample outputs are kept for generation tasks.

The stand-in tasks (tests/stand_ins.py) keep the shape of the leaderboard's tasks (multiple
choice scored by acc_norm, generation scored by exact_match through a regex filter, a group with
an aggregate, a task with its own few-shot count) on a few items in the micro zoo's prompt format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from flows.run.inputs import evaluation_settings
from flows.run.schema import ConfigError, validate
from tasks.core.errors import InputError
from tasks.evaluate import evaluate_model, evaluation_key, vllm_installed, write_samples
from tasks.lmeval import check_tasks, task_entries, task_manager
from tests.conftest import compose_config, spy_simple_evaluate
from tests.stand_ins import check_generation_samples, read_jsonl

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"

# -- stand-in tasks (tests/stand_ins.py; the `stand_ins` fixture is in conftest) ------------------

STAND_IN_ENTRIES = [
    {"task": "sg_mc", "metric": "acc_norm"},
    {"task": "sg_gen", "metric": "exact_match,strict-match", "limit": 5},
    {"task": "sg_group", "metric": "acc"},
    {"task": "sg_shots", "num_fewshot": 2, "metric": "acc"},
]


def test_each_task_scored_by_its_own_metric_and_shots(
    stand_ins: Path, micro_zoo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = spy_simple_evaluate(monkeypatch)
    result = evaluate_model(
        micro_zoo / "add", STAND_IN_ENTRIES, stand_ins, batch_size=16, log_samples="auto"
    )
    out = seen["out"]
    reported = {**out.get("groups", {}), **out["results"]}

    assert result["metrics"] == {
        "sg_mc": "acc_norm,none",
        "sg_gen": "exact_match,strict-match",
        "sg_group": "acc,none",
        "sg_shots": "acc,none",
    }
    for name, key in result["metrics"].items():
        assert result["scores"][name] == pytest.approx(reported[name][key]), name
        assert 0.0 <= result["scores"][name] <= 1.0
    assert result["avg"] == pytest.approx(sum(result["scores"].values()) / 4)
    # the task's own few-shot count reached lm-eval (its YAML says 0); the others keep theirs
    assert out["configs"]["sg_shots"]["num_fewshot"] == 2
    assert out["configs"]["sg_mc"]["num_fewshot"] == 0
    assert result["num_fewshot"]["sg_shots"] == 2
    # per-task limit: 5 generations, every other task complete; a group counts its leaves
    assert result["n_samples"] == {"sg_mc": 12, "sg_gen": 5, "sg_group": 12, "sg_shots": 12}
    assert set(out["configs"]) >= {"sg_a", "sg_b"}
    # log_samples=auto: the generation task's samples only, written as one JSONL per task
    assert result["samples_for"] == ["sg_gen"] and set(result["samples"]) == {"sg_gen"}
    paths = write_samples(tmp_path / "samples", result["samples"])
    assert paths == {"sg_gen": str(tmp_path / "samples" / "sg_gen.jsonl")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    check_generation_samples(read_jsonl(paths["sg_gen"]), result["scores"]["sg_gen"], 5)


def test_few_shot_examples_are_in_the_prompt(stand_ins: Path) -> None:
    """The count reaches the rendered prompt, not only lm-eval's config record."""
    from tasks.evaluate import build_tasks

    entries = task_entries([{"task": "sg_shots", "num_fewshot": 2}])
    objects, _, _ = build_tasks(entries, task_manager(["sg_shots"], stand_ins))
    task = objects[0]
    task.set_fewshot_seed(0)
    prompt = task.fewshot_context(task.test_docs()[0], num_fewshot=task.config.num_fewshot)
    assert prompt.count("add ") == 3, prompt


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"task": "sg_mc", "metric": "f1"}, ["sg_mc", "'f1'", "acc,none", "acc_norm,none"]),
        (
            {"task": "sg_gen", "metric": "exact_match"},
            ["sg_gen", "filters", "exact_match,strict-match", "exact_match,flexible-extract"],
        ),
        ({"task": "sg_gen", "metric": "exact_match,loose"}, ["exact_match,strict-match"]),
        ({"task": "sg_group", "metric": "acc_norm"}, ["sg_group", "acc,none"]),
        ({"task": "sg_bare_group"}, ["sg_bare_group", "no aggregate", "sg_a, sg_b"]),
        ({"task": "sg_a", "aggregation": "mean", "shots": 2}, ["eval.tasks[0]", "shots"]),
    ],
)
def test_bad_task_settings_fail_before_any_model(
    stand_ins: Path, tmp_path: Path, entry: dict[str, Any], says: list[str]
) -> None:
    """Read from the task configs alone: the model folder does not even exist."""
    with pytest.raises(InputError) as err:
        evaluate_model(tmp_path / "no-model", [entry], stand_ins)
    message = str(err.value)
    assert message.startswith("eval.tasks") and "\n" not in message
    for part in says:
        assert part in message, message


def test_names_take_the_defaults_and_mappings_their_own() -> None:
    entries = task_entries(
        ["a", {"task": "b", "num_fewshot": 0, "metric": "acc_norm", "limit": 10}],
        num_fewshot=5,
        limit=None,
        metric="acc",
    )
    assert entries == [
        {"task": "a", "num_fewshot": 5, "metric": "acc", "limit": None, "aggregation": None},
        {"task": "b", "num_fewshot": 0, "metric": "acc_norm", "limit": 10, "aggregation": None},
    ]
    with pytest.raises(InputError, match="listed twice"):
        task_entries(["a", {"task": "a"}])


# -- the leaderboard suites as config ------------------------------------------------------------

# Open LLM Leaderboard v1: task -> (few-shot, metric)
OPEN_LLM_V1 = {
    "arc_challenge": (25, "acc_norm"),
    "hellaswag": (10, "acc_norm"),
    "mmlu": (5, "acc"),
    "truthfulqa_mc2": (0, "acc"),
    "winogrande": (5, "acc"),
    "gsm8k": (5, "exact_match,strict-match"),
}
# the same suite on tinyBenchmarks (tinyMMLU's prompts hold their 5 shots; on tinyMMLU and
# Winogrande acc_norm equals acc)
OPEN_LLM_TINY = {
    "tinyArc": (25, "acc_norm"),
    "tinyHellaswag": (10, "acc_norm"),
    "tinyMMLU": (0, "acc_norm"),
    "tinyTruthfulQA": (0, "acc"),
    "tinyWinogrande": (5, "acc_norm"),
    "tinyGSM8k": (5, "exact_match,strict-match"),
}


@pytest.mark.parametrize(
    ("group", "table"), [("open_llm", OPEN_LLM_V1), ("open_llm_tiny", OPEN_LLM_TINY)]
)
def test_leaderboard_suites_match_their_settings(group: str, table: dict[str, tuple]) -> None:
    cfg = validate(compose_config("+experiment=greedy_kinship", f"eval={group}"))
    settings = evaluation_settings(cfg, None)
    got = {t["task"]: (t["num_fewshot"], t["metric"]) for t in settings["tasks"]}
    assert got == table
    assert all(t["limit"] is None for t in settings["tasks"])
    if group == "open_llm_tiny":
        # plain mean: lm-eval's IRT aggregation needs the tinyBenchmarks package (not on PyPI)
        assert all(t["aggregation"] == "mean" for t in settings["tasks"])
        names = set()
        for path in (LM_EVAL_TASKS / "tinyBenchmarks").glob("*.yaml"):
            text = path.read_text()
            names |= {
                line.split(":", 1)[1].strip()
                for line in text.splitlines()
                if line.startswith("task: ")
            }
        assert set(table) <= names, names


# -- zoo tasks beside built-in tasks -------------------------------------------------------------


def test_local_tasks_alone_do_not_index_the_builtin_ones(micro_zoo: Path) -> None:
    manager = task_manager(["zoo_add"], micro_zoo / "tasks")
    assert "zoo_add" in manager.task_index and "arc_challenge" not in manager.task_index


def test_zoo_and_builtin_tasks_resolve_together(micro_zoo: Path) -> None:
    """The leaderboard's tasks are checked from lm-eval's own configs (no dataset download)."""
    check_tasks(
        ["zoo_add", {"task": "gsm8k", "metric": "exact_match,strict-match"}, {"task": "mmlu"}],
        micro_zoo / "tasks",
    )
    with pytest.raises(InputError, match=r"'hellaswag' does not report metric 'f1'.*acc_norm,none"):
        check_tasks(["zoo_add", {"task": "hellaswag", "metric": "f1"}], micro_zoo / "tasks")
    with pytest.raises(InputError, match="tinyBenchmarks.*no aggregate"):
        check_tasks(["tinyBenchmarks"], None)
    check_tasks([{"task": "tinyArc", "metric": "acc_norm", "aggregation": "mean"}], None)
    if importlib.util.find_spec("tinyBenchmarks") is None:
        # lm-eval's own aggregation imports the package: named before any dataset or model
        with pytest.raises(InputError, match="'tinyArc' cannot be loaded.*pip install"):
            check_tasks([{"task": "tinyArc", "metric": "acc_norm"}], None)


# -- the evaluation cache key --------------------------------------------------------------------


def _key(*overrides: str) -> str:
    cfg = validate(compose_config("+experiment=greedy_kinship", *overrides))
    return evaluation_key("fp", evaluation_settings(cfg, None))


def test_cache_key_follows_what_changes_scores() -> None:
    base = _key()
    assert _key("eval.num_fewshot=3") != base
    assert _key("eval.tasks=[{task:'zoo:*',num_fewshot:3}]") != base
    assert _key("eval.apply_chat_template=true") != base
    assert _key("eval.metric=acc_norm") != base
    assert _key("eval.limit=10") != base
    assert _key("eval.system_instruction=Be brief.") != base
    assert _key("eval.gen_kwargs={max_gen_toks:16}") != base
    # how the model runs, or what is kept of it, not what it scores
    assert _key("eval.batch_size=3") == base
    assert _key("device=cpu") == base
    assert _key("eval.log_samples=true") == _key("eval.log_samples=false") == base
    # lm-eval ignores fewshot_as_multiturn without a chat template
    assert _key("eval.fewshot_as_multiturn=true") == base
    chat = _key("eval.apply_chat_template=true")
    assert _key("eval.apply_chat_template=true", "eval.fewshot_as_multiturn=true") != chat
    # a name and the mapping that spells out the defaults are the same benchmark
    assert _key("eval.tasks=[{task:'zoo:*'}]") == base


# -- config errors -------------------------------------------------------------------------------


@pytest.mark.skipif(vllm_installed(), reason="vllm is installed here")
def test_vllm_backend_without_vllm_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config("+experiment=greedy_kinship", "eval.backend=vllm"))
    message = str(err.value)
    assert message.startswith("eval.backend") and "pip install vllm" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.backend=tgi", "eval.backend"),
        ("eval.tasks=[{task:zoo_add,shots:2}]", "eval.tasks[0]"),
        ("eval.tasks=[{num_fewshot:2}]", "eval.tasks[0]"),
        ("eval.tasks=[{task:zoo_add,num_fewshot:-1}]", "eval.tasks[0].num_fewshot"),
        ("eval.tasks=[{task:zoo_add,limit:0}]", "eval.tasks[0].limit"),
    ],
)
def test_bad_eval_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config("+experiment=greedy_kinship", override))
    assert str(err.value).startswith(key), str(err.value)


# -- the final benchmark (final_eval) ------------------------------------------------------------


@pytest.mark.parametrize("group", ["zoo", "open_llm", "open_llm_tiny"])
def test_final_eval_selects_an_eval_config(group: str) -> None:
    """`final_eval=X` is conf/eval/X.yaml plus top_k; null (no final benchmark) by default."""
    assert validate(compose_config("+experiment=greedy_kinship")).final_eval is None
    cfg = validate(compose_config("+experiment=greedy_kinship", f"final_eval={group}"))
    assert cfg.final_eval.top_k == 1
    ev = evaluation_settings(validate(compose_config(f"eval={group}")), None)
    final = evaluation_settings(cfg, None, "final_eval")
    assert final == ev
    # the same benchmark is the same cached evaluation, whichever config asked for it
    assert evaluation_key("fp", final) == evaluation_key("fp", ev)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("final_eval.top_k=0", "final_eval.top_k"),
        ("final_eval.log_samples=some", "final_eval.log_samples"),
        ("final_eval.backend=tgi", "final_eval.backend"),
        ("final_eval.tasks=[{task:zoo_add,shots:2}]", "final_eval.tasks[0]"),
    ],
)
def test_bad_final_eval_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config("+experiment=greedy_kinship", "final_eval=zoo", override))
    assert str(err.value).startswith(key), str(err.value)


def test_final_benchmark_is_checked_before_any_work(stand_ins: Path, tmp_path: Path) -> None:
    """A metric the final suite's task does not report fails in check_inputs: before Prefect
    starts, let alone before the search's first model is evaluated."""

    from flows.run.inputs import check_inputs

    cfg = validate(
        compose_config(
            "+experiment=greedy_kinship",
            f"paths.root={tmp_path}",
            "final_eval=zoo",
            f"final_eval.include_path={stand_ins}",
            "final_eval.tasks=[sg_mc,{task:sg_gen,metric:exact_match}]",
        )
    )
    with pytest.raises(InputError) as err:
        check_inputs(cfg)
    message = str(err.value)
    assert message.startswith("final_eval.tasks") and "sg_gen" in message, message
    assert "exact_match,strict-match" in message and "\n" not in message
    assert not list(tmp_path.iterdir())
