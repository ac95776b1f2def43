"""The lm-eval behaviour tasks/lmeval.py relies on, pinned to the version it was checked against.

On a task folder of the shapes the adapter meets (a template `include:`d by a task, a
`!function` beside the YAML, data files named relative to the YAML's folder, a group, a tag),
without any model: what lm-eval's index holds, how it resolves `include:` and data files, that
a task config handed over as a dict is the whole config. An lm-eval upgrade fails the version
test first, with what to re-check.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import yaml

from tasks import lmeval
from tasks.core.errors import InputError

RECHECK = (
    "tasks/lmeval.py was checked against lm-eval {pinned}; {found} is installed. Re-check what "
    "it relies on, then update LM_EVAL_VERSION: TaskManager.task_index entries (.cfg with "
    "`include:` merged, .yaml_path, .tags) and all_groups/all_tags/all_subtasks; an unresolved "
    "`!function mod.fn` kept as '<YAML folder>/mod.fn'; lm_eval.tasks._yaml_loader."
    "_import_func_in_yml(spec, folder); a dict given to TaskManager.load is the whole task "
    "config; `include:` lets the including file's keys win; relative data_files resolve "
    "against the cwd; tasks render prompts through lm_eval.utils.apply_template(template, "
    "doc), looked up on the module at each call; the evaluator builds a task's requests by "
    "calling `task.build_all_requests(**kwargs)` on the object and reads `task.instances`, "
    "writes responses into Instance.resps/filtered_resps, and adds the environment through "
    "`add_env_info` named in lm_eval.evaluator. The tests below check each one."
)


def test_lm_eval_is_the_pinned_version() -> None:
    found = importlib.metadata.version("lm_eval")
    pinned = lmeval.LM_EVAL_VERSION
    assert found == pinned, RECHECK.format(pinned=pinned, found=found)


# -- a task folder -------------------------------------------------------------------------------

ROWS = [{"prompt": f"q{i}=", "choices": ["a", "b"], "label": i % 2} for i in range(4)]
HELPERS = "def agg(items):\n    return sum(items) / len(items)\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Task YAMLs (written as text: `!function` is lm-eval's tag) and their data."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / "helpers.py").write_text(HELPERS)
    (tasks / "needs_missing.py").write_text("import no_such_package_here\n" + HELPERS)
    (tasks / "_template.yaml").write_text(
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: rows.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: 'template {{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: !function helpers.agg\n"
        "    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    (tasks / "t_one.yaml").write_text(
        "include: _template.yaml\ntask: t_one\ntag: t_tag\ndoc_to_text: 'one {{prompt}}'\n"
    )
    (tasks / "t_two.yaml").write_text(
        "include: _template.yaml\ntask: t_two\n"
        "metric_list:\n  - metric: acc\n    aggregation: !function needs_missing.agg\n"
        "    higher_is_better: true\n"
    )
    group = {"group": "t_group", "task": ["t_one"], "aggregate_metric_list": [{"metric": "acc"}]}
    (tasks / "t_group.yaml").write_text(yaml.safe_dump(group))
    return tasks


def _plain(folder: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def test_index_holds_included_configs_with_functions_unresolved(folder: Path) -> None:
    manager = _plain(folder)
    entry = manager.task_index["t_one"]
    assert Path(entry.yaml_path) == folder / "t_one.yaml"
    # the template's keys, the task's own winning; no `include` left
    assert entry.cfg["doc_to_text"] == "one {{prompt}}" and entry.cfg["dataset_path"] == "json"
    assert "include" not in entry.cfg
    assert entry.cfg["dataset_kwargs"] == {"data_files": {"test": "rows.jsonl"}}
    # `!function` unresolved, relative to the YAML that holds it
    ref = entry.cfg["metric_list"][0]["aggregation"]
    assert ref == str(folder / "helpers.agg") and lmeval._is_function(ref)
    assert not lmeval._is_function(entry.cfg["doc_to_text"])
    # the public listings the adapter reads kinds from, and a tag's members
    assert "t_group" in manager.all_groups and "t_tag" in manager.all_tags
    assert {"t_one", "t_two"} <= set(manager.all_subtasks)
    assert manager.task_index["t_tag"].tags == {"t_one"}
    assert manager.task_index["t_group"].cfg["task"] == ["t_one"]
    assert lmeval._kinds(manager)["t_one"] == lmeval.TASK
    assert lmeval._kinds(manager)["t_group"] == lmeval.GROUP


def test_functions_import_as_lm_eval_resolves_them(folder: Path) -> None:
    cfg = _plain(folder).task_index["t_one"].cfg
    agg = lmeval._import_functions(cfg)["metric_list"][0]["aggregation"]
    assert agg.__name__ == "agg" and agg([1.0, 0.0]) == 0.5
    with pytest.raises(ImportError):
        lmeval._import_functions(_plain(folder).task_index["t_two"].cfg)


def test_relative_data_files_resolve_against_the_cwd(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the adapter indexes a mirror of the folder: lm-eval itself looks in the cwd."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="rows.jsonl"):
        _plain(folder).load(["t_one"])


def test_the_mirror_loads_tasks_and_group_members_from_any_cwd(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manager = lmeval.task_manager(["t_one", "t_group"], folder)
    assert lmeval.all_local(["t_one", "t_group", "t_tag"], folder)
    cfg = manager.task_index["t_one"].cfg
    # the including file's keys win; the rest is the original's, its template's and functions'
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(folder / "rows.jsonl")}}
    assert cfg["doc_to_text"] == "one {{prompt}}"
    assert cfg["metric_list"][0]["aggregation"] == str(folder / "helpers.agg")
    loaded = manager.load(["t_group"])
    assert len(loaded["tasks"]["t_one"].eval_docs) == len(ROWS)
    assert lmeval.reported_metrics("t_group", manager) == ["acc,none"]


def test_a_dict_is_the_whole_task_config(folder: Path, tmp_path: Path) -> None:
    """The aggregation override hands lm-eval the task's config as a dict: lm-eval must take it
    as it is, not merge it into the registered task of the same name."""
    manager = lmeval.task_manager(["t_one"], folder)
    spec = lmeval.task_spec("t_one", manager, "mean")
    assert isinstance(spec, dict) and "tag" not in spec
    assert spec["metric_list"][0]["aggregation"] == "mean"
    task = manager.load([{**spec, "doc_to_text": "dict {{prompt}}"}])["tasks"]["t_one"]
    assert task.config.doc_to_text == "dict {{prompt}}"
    assert task.aggregation()["acc"].__name__ == "mean"
    assert lmeval.task_spec("t_one", manager) == "t_one"


def test_a_missing_package_is_named_unless_its_aggregation_is_replaced(folder: Path) -> None:
    """As with tinyBenchmarks' aggregations (their package is not on PyPI)."""
    lmeval.check_tasks([{"task": "t_two", "aggregation": "mean"}], folder)
    with pytest.raises(InputError, match="'t_two' cannot be loaded.*no_such_package_here"):
        lmeval.check_tasks(["t_two"], folder)
    with pytest.raises(InputError, match="'t_tag' is a tag of 1 tasks"):
        lmeval.check_tasks(["t_tag"], folder)


# -- templates compiled once ---------------------------------------------------------------------


def test_tasks_render_through_the_module_function() -> None:
    """What install_template_cache relies on: lm-eval's tasks call `utils.apply_template` by
    its module attribute (so replacing it there reaches them), with (template, doc)."""
    import inspect

    from lm_eval import utils
    from lm_eval.api import task

    assert "utils.apply_template(" in inspect.getsource(task.ConfigurableTask)
    assert "from lm_eval.utils import apply_template" not in inspect.getsource(task)
    assert list(inspect.signature(utils.apply_template).parameters) == ["template", "doc"]
    doc = {"prompt": "1+2=", "choices": ["3", "4"]}
    for template in ("{{prompt}}", "{{choices}}", "{{prompt|regex_replace('=', '?')}}\n"):
        rendered = lmeval.render_template(template, doc)
        assert rendered == utils.env.from_string(template).render(**doc)
    own = lmeval.install_template_cache()
    assert utils.apply_template is lmeval.render_template
    assert own.__module__ == "lm_eval.utils" and lmeval.install_template_cache() is own


def test_an_evaluation_scores_the_same_with_templates_compiled_once(
    micro_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same scores and the same prompts, document by document, as with lm-eval's own
    rendering (which compiles each template anew)."""
    from lm_eval import utils

    from tasks.evaluate import evaluate_model
    from tasks.zoo.build import load_manifest

    manifest = load_manifest(micro_zoo)
    args = (micro_zoo / "base", list(manifest["tasks"]), micro_zoo / manifest["task_dir"])
    own = lmeval.install_template_cache()
    with monkeypatch.context() as patch:
        patch.setattr(utils, "apply_template", own)
        without = evaluate_model(*args, log_samples=True)
        assert utils.apply_template is own  # evaluate_model installs the cache once only
    assert utils.apply_template is lmeval.render_template
    with_cache = evaluate_model(*args, log_samples=True)
    assert with_cache["scores"] == without["scores"]
    assert with_cache["samples"] == without["samples"]


# -- requests built once per process (tasks/lmeval.py RequestCache) -------------------------------

BUILD_ARGS = {
    "limit",
    "samples",
    "rank",
    "world_size",
    "cache_requests",
    "rewrite_requests_cache",
    "system_instruction",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "chat_template",
    "tokenizer_name",
}


def test_the_evaluator_builds_requests_through_the_task_object() -> None:
    """What RequestCache.attach relies on: the evaluator calls `build_all_requests` on each task
    object, by keyword, with these arguments only (all but the LM's chat method and tokenizer
    name count in the key), then reads `task.instances`; the model's responses and the filters'
    outputs are written into the instances (so each evaluation needs its own); an Instance is a
    dataclass whose responses are the fields `resps` and `filtered_resps`."""
    import dataclasses
    import inspect

    from lm_eval import evaluator
    from lm_eval.api.filter import FilterEnsemble
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task

    source = inspect.getsource(evaluator.evaluate)
    call = source[source.index("task.build_all_requests(") :]
    call = call[: call.index("\n        )")]
    assert set(re.findall(r"(\w+)=", call)) == BUILD_ARGS
    assert "for instance in task.instances:" in source
    assert "req.resps.append(x)" in source
    assert "inst.filtered_resps[self.name] = resp" in inspect.getsource(FilterEnsemble.apply)
    params = inspect.signature(Task.build_all_requests).parameters
    assert set(params) - {"self"} == BUILD_ARGS
    assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n != "self")
    fields = {f.name for f in dataclasses.fields(Instance)}
    assert {"resps", "filtered_resps", "arguments", "doc", "metadata"} <= fields


def test_the_environment_is_added_through_the_evaluators_name() -> None:
    """What install_env_info_cache relies on: simple_evaluate calls `add_env_info(results)` by
    the name in lm_eval.evaluator, which is lm_eval.loggers.utils.add_env_info; the cached one
    adds the same keys."""
    import inspect

    from lm_eval import evaluator
    from lm_eval.loggers import utils

    assert "add_env_info(results)" in inspect.getsource(evaluator.simple_evaluate)
    own = lmeval.install_env_info_cache()
    assert own is utils.add_env_info and evaluator.add_env_info is not own
    assert lmeval.install_env_info_cache() is own
    mine: dict = {}
    evaluator.add_env_info(mine)
    assert set(mine) == {
        "pretty_env_info",
        "transformers_version",
        "lm_eval_version",
        "upper_git_hash",
    }


def _built(manager, name: str, **build: object) -> tuple[object, str]:
    """A freshly loaded task with its requests built as the evaluator builds them."""
    task = manager.load([name])["tasks"][name]
    task.set_config(key="num_fewshot", value=build.pop("num_fewshot", 0))
    task.set_fewshot_seed(seed=1234)
    args = {"limit": None, "samples": None, "rank": 0, "world_size": 1, **build}
    key = lmeval.request_key(task, "", args)
    task.build_all_requests(**args)
    return task, key


def test_the_request_key_follows_the_content_not_the_name(folder: Path) -> None:
    """Two loads of one task build the same requests under one key; other documents under the
    same name and path (another zoo seed), another shot count or other document indices give
    another key; a fresh copy of an instance has the request without the responses."""
    manager = lmeval._task_manager(str(folder), False)
    first, key = _built(manager, "t_one")
    again, same = _built(manager, "t_one")
    assert same == key
    assert [i.args for i in again.instances] == [i.args for i in first.instances]
    assert _built(manager, "t_one", num_fewshot=1)[1] != key
    assert _built(manager, "t_one", samples=[0, 1])[1] != key
    reordered = ROWS[::-1]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reordered))
    other, changed = _built(lmeval._task_manager(str(folder), False), "t_one")
    assert changed != key
    assert [i.doc["prompt"] for i in other.instances[::2]] == [r["prompt"] for r in reordered]
    instance = first.instances[0]
    instance.resps.append((-1.0, False))
    instance.filtered_resps["none"] = (-1.0, False)
    copy = lmeval.fresh_instance(instance)
    assert copy.args == instance.args and copy.doc is instance.doc
    assert (copy.resps, copy.filtered_resps) == ([], {})
    assert (copy.task_name, copy.doc_id, copy.idx) == ("t_one", 0, 0)


def test_a_datasets_documents_hash_by_the_rows_they_select(folder: Path) -> None:
    """What `_hash_docs` relies on (datasets 5.2.0 with lm-eval 0.4.13): a loaded split is a
    `datasets.Dataset` with no index mapping (`_indices` None: its table is its rows); a
    select of other rows has one, and hashes by those rows, not its parent's buffers."""
    import hashlib

    import datasets

    manager = lmeval._task_manager(str(folder), False)
    docs = manager.load(["t_one"])["tasks"]["t_one"].eval_docs
    assert isinstance(docs, datasets.Dataset) and docs._indices is None

    def digest(d: object) -> str:
        h = hashlib.sha256()
        lmeval._hash_docs(h, d)
        return h.hexdigest()

    picked = docs.select([3, 1])
    assert picked._indices is not None
    assert digest(docs) == digest(docs.select(range(len(docs))))
    assert len({digest(docs), digest(picked), digest(docs.select([1, 3]))}) == 3
