"""Requests built once per benchmark per process (tasks/lmeval.py RequestCache), on real models:
the same scores and per-sample outputs with and without the reuse, on the micro zoo's tasks and
on stand-ins of each leaderboard shape; other documents under the same task name and path (a
zoo of another seed) get their own requests; models evaluated one after another, or in two
threads at once, each get their own scores."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tasks import lmeval
from tasks.evaluate import evaluate_model
from tasks.zoo.build import load_manifest


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """Each test starts from an empty cache, with the reuse on, and leaves it so."""
    lmeval.REQUESTS.clear()
    lmeval.REQUESTS.enabled = True
    yield
    lmeval.REQUESTS.clear()
    lmeval.REQUESTS.enabled = True


def _zoo_args(zoo: Path) -> tuple[list[str], Path]:
    manifest = load_manifest(zoo)
    return list(manifest["tasks"]), zoo / manifest["task_dir"]


def _without_reuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
    lmeval.REQUESTS.enabled = False
    try:
        return evaluate_model(*args, **kwargs)
    finally:
        lmeval.REQUESTS.enabled = True


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["scores"] == b["scores"]
    assert a["n_samples"] == b["n_samples"]
    assert a["samples"] == b["samples"]  # prompts, responses, filtered answers, per-doc metrics


def _no_responses_kept() -> None:
    for key in lmeval.REQUESTS.keys():
        kept = lmeval.REQUESTS.templates(key)
        assert kept and all(not i.resps and not i.filtered_resps for i in kept), key


STAND_INS = [
    {"task": "sg_mc", "metric": ["acc", "acc_norm"], "choices": 4, "num_fewshot": 2},
    {"task": "sg_group", "metric": "acc", "choices": {"sg_a": 2, "sg_b": 3}},
    {"task": "sg_gen", "metric": "exact_match,strict-match", "choices": 0, "limit": 6},
    {"task": "sg_shots", "metric": "acc"},
]


@pytest.mark.parametrize("suite", ["zoo", "stand_ins"])
def test_reused_requests_score_as_built_ones(suite: str, micro_zoo: Path, stand_ins: Path) -> None:
    """Without the reuse, building it (a miss) and reusing it (a hit): the same evaluation."""
    if suite == "zoo":
        names, folder = _zoo_args(micro_zoo)
        args, leaves = (micro_zoo / "base", names, folder), len(names)
    else:  # multiple choice with shots, a group of two, generation through filters, own shots
        args, leaves = (micro_zoo / "add", STAND_INS, stand_ins), 5
    without = _without_reuse(*args, log_samples=True, batch_size=16)
    assert len(lmeval.REQUESTS) == 0
    built = evaluate_model(*args, log_samples=True, batch_size=16)
    assert (lmeval.REQUESTS.misses, lmeval.REQUESTS.hits, len(lmeval.REQUESTS)) == (
        leaves,
        0,
        leaves,
    )
    reused = evaluate_model(*args, log_samples=True, batch_size=16)
    assert (lmeval.REQUESTS.misses, lmeval.REQUESTS.hits) == (leaves, leaves)
    _same(built, without)
    _same(reused, without)
    _no_responses_kept()


def test_other_documents_under_the_same_name_get_their_own_requests(
    micro_zoo: Path, tmp_path: Path
) -> None:
    """A zoo of another seed writes the same task names and files with other documents: the
    task's key changes and its scores are those of an evaluation without the reuse."""
    names, folder = _zoo_args(micro_zoo)
    tasks = shutil.copytree(folder, tmp_path / "tasks")
    model = micro_zoo / "base"
    first = evaluate_model(model, names, tasks, log_samples=True)
    keys = set(lmeval.REQUESTS.keys())
    data = tasks / f"{names[0]}.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    other = rows[len(rows) // 3 :][::-1]  # other documents, in another order
    data.write_text("".join(json.dumps(r) + "\n" for r in other))
    changed = evaluate_model(model, names, tasks, log_samples=True)
    new_keys = set(lmeval.REQUESTS.keys()) - keys
    assert [k.split("-")[0] for k in new_keys] == [names[0]]  # the others were reused
    assert changed["n_samples"][names[0]] == len(other) != first["n_samples"][names[0]]
    assert [r["prompt"] for r in changed["samples"][names[0]]] == [r["prompt"] for r in other]
    _same(changed, _without_reuse(model, names, tasks, log_samples=True))


def test_models_one_after_another_and_at_once_get_their_own_scores(micro_zoo: Path) -> None:
    """No model's responses reach another's scores: each model evaluated on requests another
    evaluation built, in turn and in two threads at once, scores as it does alone without the
    reuse."""
    names, folder = _zoo_args(micro_zoo)
    models = [micro_zoo / "base", micro_zoo / "add", micro_zoo / "rev"]
    alone = {m: _without_reuse(m, names, folder, log_samples=True) for m in models}
    assert len({json.dumps(r["scores"]) for r in alone.values()}) > 1  # they do differ
    for m in models:
        _same(evaluate_model(m, names, folder, log_samples=True), alone[m])
    assert lmeval.REQUESTS.hits == len(names) * (len(models) - 1)
    with ThreadPoolExecutor(2) as pool:
        at_once = list(
            pool.map(lambda m: evaluate_model(m, names, folder, log_samples=True), models * 2)
        )
    for m, result in zip(models * 2, at_once, strict=True):
        _same(result, alone[m])
    _no_responses_kept()


def test_with_a_chat_template_the_template_and_its_tokens_count(micro_zoo: Path) -> None:
    """Requests rendered through a chat template depend on the template and the special tokens
    it renders; without one they are plain strings and the tokenizer does not count."""
    from tasks.core.load import load_model
    from tasks.evaluate import _quiet_hflm

    model, tokenizer = load_model(micro_zoo / "base", "cpu", "float32")
    lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert lmeval.chat_key(lm, False) == ""
    first = lmeval.chat_key(lm, True)
    assert lmeval.chat_key(lm, True) == first
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    other_template = lmeval.chat_key(lm, True)
    tokenizer.add_special_tokens({"pad_token": "<another-pad>"})
    other_tokens = lmeval.chat_key(lm, True)
    assert len({first, other_template, other_tokens}) == 3

    names, folder = _zoo_args(micro_zoo)
    manager = lmeval.task_manager(names, folder)
    task = manager.load([names[0]])["tasks"][names[0]]
    task.set_fewshot_seed(seed=1234)
    plain = {"limit": None, "apply_chat_template": False}
    chat = {"limit": None, "apply_chat_template": True}
    assert lmeval.request_key(task, first, plain) == lmeval.request_key(task, "", plain)
    assert lmeval.request_key(task, first, chat) != lmeval.request_key(task, other_tokens, chat)
