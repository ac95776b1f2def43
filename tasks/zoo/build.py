"""The embedded model zoo: a tiny Llama base and one fine-tune per synthetic skill, plus an
lm-eval task per skill on held-out local data. Deterministic from the config's seed.

Skills (prompt -> answer):
- add: `add 12+7=` -> `19`
- rev: `rev abcd=` -> `dcba`
- srt: `srt dbca=` -> `abcd`
- kb:  `kb qzx=` -> `mle` (random key -> value facts)
- rot: `rot abcd=` -> `bcda` (first letter moved to the end)
- max: `max 3 9 4=` -> `9` (the largest digit)

The default zoo has the first four; `zoo=wide` adds rot and max (same vocabulary, so the same
tokenizer).

The base learns every prompt format with random answers, so it knows the formats but no skill;
each foundation model learns one skill, and forgets the others' formats a little, which is what
makes merging them pay off.
"""

from __future__ import annotations

import json
import random
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.errors import InputError
from tasks.core.store import atomic_dir, stable_hash, to_plain, write_json_atomic
from tasks.zoo.train import CHARS as CHARS
from tasks.zoo.train import (
    FineTune,
    build_tokenizer,
    deterministic,
    new_model,
    resolve_workers,
    run_finetunes,
    save,
    train,
)

# bump when the build code changes what a config produces, so old zoos are rebuilt
ZOO_FORMAT = 2
MANIFEST_FILE = "manifest.json"
TASK_DIR = "tasks"
LETTERS = string.ascii_lowercase
SKILLS = ("add", "rev", "srt", "kb", "rot", "max")
MAX_WRONG_TRIES = 100
WORD_SKILLS: dict[str, Callable[[str], str]] = {
    "rev": lambda w: w[::-1],
    "srt": lambda w: "".join(sorted(w)),
    "rot": lambda w: w[1:] + w[:1],
}
ZOO_REF = "zoo:"  # `zoo:<skill>` names a zoo model (or, in eval.tasks, its task); `zoo:*` all


# -- synthetic skills --------------------------------------------------------------------------


class SkillData:
    """Prompts, correct answers and same-form wrong answers for every skill."""

    def __init__(self, data_cfg: Mapping[str, Any], rng: random.Random) -> None:
        self.cfg = data_cfg
        keys: set[str] = set()
        while len(keys) < data_cfg["n_facts"]:
            keys.add(self._word(rng, data_cfg["fact_len"]))
        self.facts = {k: self._word(rng, data_cfg["fact_len"]) for k in sorted(keys)}
        self.values = list(self.facts.values())

    @staticmethod
    def _word(rng: random.Random, n: int) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(n))

    def sample(self, skill: str, rng: random.Random) -> tuple[str, str]:
        """A random (prompt, correct answer) of `skill`."""
        if skill == "add":
            a, b = rng.randrange(self.cfg["max_operand"]), rng.randrange(self.cfg["max_operand"])
            return f"add {a}+{b}=", str(a + b)
        if skill in WORD_SKILLS:
            word = self._word(rng, rng.randint(self.cfg["word_min"], self.cfg["word_max"]))
            answer = WORD_SKILLS[skill](word)
            return f"{skill} {word}=", answer
        if skill == "max":
            digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
            return f"max {' '.join(digits)}=", max(digits)
        if skill == "kb":
            key = rng.choice(list(self.facts))
            return f"kb {key}=", self.facts[key]
        raise ValueError(f"zoo.skills: unknown skill '{skill}'; choose from {', '.join(SKILLS)}")

    def wrong(
        self,
        skill: str,
        prompt: str,
        answer: str,
        rng: random.Random,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> str:
        """An answer of the same form that is neither correct nor in `exclude`.

        Wrong answers are near misses (close sums, permutations of the word, other facts'
        values), so a model only scores by knowing the skill, not the answer format.
        """
        spread = self.cfg["add_spread"]
        for _ in range(MAX_WRONG_TRIES):
            if skill == "add":
                cand = str(max(0, int(answer) + rng.choice([-1, 1]) * rng.randint(1, spread)))
            elif skill in WORD_SKILLS:
                letters = list(prompt.split(" ", 1)[1].rstrip("="))
                rng.shuffle(letters)
                cand = "".join(letters)
            elif skill == "max":
                # mostly the other digits shown, so reading the prompt is not enough
                shown = prompt.split(" ", 1)[1].rstrip("=").split()
                cand = rng.choice([*shown, str(rng.randrange(10))])
            else:
                cand = rng.choice([*self.values, self._word(rng, len(answer))])
            if cand != answer and cand not in exclude:
                return cand
        # few distinct permutations (e.g. "aab"): fall back to random letters of the same length
        while (cand := self._word(rng, len(answer))) == answer or cand in exclude:
            pass
        return cand

    def pretrain_sample(self, skills: Sequence[str], rng: random.Random) -> str:
        skill = rng.choice(list(skills))
        prompt, answer = self.sample(skill, rng)
        if rng.random() >= self.cfg["pretrain_correct"]:
            answer = self.wrong(skill, prompt, answer, rng)
        return prompt + answer


def held_out_items(
    data: SkillData, skill: str, n_items: int, n_choices: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Multiple-choice items; for kb every fact is asked once (facts cannot be held out)."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    facts = [(f"kb {k}=", v) for k, v in data.facts.items()][:n_items] if skill == "kb" else []
    while len(items) < (len(facts) if facts else n_items):
        prompt, answer = facts[len(items)] if facts else data.sample(skill, rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        choices = {answer}
        while len(choices) < n_choices:
            choices.add(data.wrong(skill, prompt, answer, rng, exclude=choices))
        ordered = sorted(choices)
        rng.shuffle(ordered)
        items.append({"prompt": prompt, "choices": ordered, "label": ordered.index(answer)})
    return items


# -- lm-eval tasks -------------------------------------------------------------------------------


def task_name(skill: str) -> str:
    return f"zoo_{skill}"


def expand_zoo(entries: Sequence[Any], skills: Sequence[str], *, tasks: bool = False) -> list[Any]:
    """Replace `zoo:*` by one entry per skill, in order: `zoo:<skill>` for model references, the
    skill's lm-eval task name for eval tasks (where `zoo:<skill>` also names that task). An
    eval.tasks mapping keeps its settings: `{task: "zoo:*", num_fewshot: 2}` becomes one such
    mapping per skill."""
    out: list[Any] = []
    for entry in entries:
        if isinstance(entry, Mapping):
            out.extend(
                {**entry, "task": name} for name in expand_zoo([entry["task"]], skills, tasks=tasks)
            )
            continue
        if not entry.startswith(ZOO_REF):
            out.append(entry)
            continue
        chosen = list(skills) if entry == f"{ZOO_REF}*" else [entry.removeprefix(ZOO_REF)]
        out.extend(task_name(s) if tasks else f"{ZOO_REF}{s}" for s in chosen)
    return out


def task_yaml(skill: str) -> dict[str, Any]:
    """The lm-eval config of a zoo task; data_files is relative to the YAML's folder."""
    return {
        "task": task_name(skill),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{task_name(skill)}.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        # the answer follows `=` directly, as in training
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_tasks(task_dir: Path, items: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    task_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for skill, rows in items.items():
        name = task_name(skill)
        with (task_dir / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml(skill), sort_keys=False))
        names.append(name)
    return names


# -- build ---------------------------------------------------------------------------------------


# how many processes build the zoo does not change its bytes, so it is not part of its identity
# (the torch thread count per model is: `threads` stays in the hash)
NOT_IDENTITY = ("workers",)


def config_hash(cfg: Mapping[str, Any]) -> str:
    identity = {k: v for k, v in to_plain(cfg).items() if k not in NOT_IDENTITY}
    return stable_hash({"format": ZOO_FORMAT, "zoo": identity})


def load_manifest(zoo_dir: Path) -> dict[str, Any]:
    path = Path(zoo_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no zoo at {zoo_dir} (missing {MANIFEST_FILE}); run flows.zoo")
    return json.loads(path.read_text())


def build_zoo(zoo_dir: Path, cfg: Mapping[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Build the zoo into `zoo_dir` (atomically), or return the manifest if it is up to date.

    The fine-tunes run in `cfg["workers"]` processes (`auto`: one per `threads` free cores) and
    give the same bytes whatever that number is."""
    zoo_dir = Path(zoo_dir).resolve()
    cfg = to_plain(cfg)
    wanted = config_hash(cfg)
    if (zoo_dir / MANIFEST_FILE).is_file():
        manifest = load_manifest(zoo_dir)
        if manifest.get("config_hash") == wanted:
            return manifest
    skills = list(cfg["skills"])
    if any(s not in SKILLS for s in skills) or len(skills) < 2 or len(set(skills)) < len(skills):
        raise InputError(f"zoo.skills: need two or more of {', '.join(SKILLS)}, got {skills}")
    workers = resolve_workers(cfg["workers"], cfg["threads"], len(skills))

    started = time.time()
    with deterministic(cfg["threads"]), atomic_dir(zoo_dir) as tmp:
        manifest = _build(tmp, cfg, skills, workers, progress)
        manifest["config_hash"] = wanted
        if cfg["quality_check"]:
            manifest["quality"] = quality_check(tmp, manifest, cfg)
        manifest["build_seconds"] = round(time.time() - started, 1)
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
    return manifest


def _build(
    out: Path, cfg: Mapping[str, Any], skills: list[str], workers: int, progress: bool
) -> dict:
    """Train and save the base, the foundations and the tasks into `out`; the manifest body."""
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])  # one stream, one data order: the seed fixes everything
    data = SkillData(cfg["data"], rng)
    ev = cfg["eval"]
    eval_items = {s: held_out_items(data, s, ev["n_items"], ev["n_choices"], rng) for s in skills}
    # held-out prompts never appear in training (kb facts are the knowledge itself)
    held_out = {i["prompt"] for s, items in eval_items.items() if s != "kb" for i in items}

    def skill_text(skill: str) -> str:
        while True:
            prompt, answer = data.sample(skill, rng)
            if prompt not in held_out:
                return prompt + answer

    def draw(opt: Mapping[str, Any], text: Callable[[], str]) -> Iterator[list[str]]:
        return ([text() for _ in range(opt["batch_size"])] for _ in range(opt["steps"]))

    tokenizer = build_tokenizer(cfg["model"]["max_position_embeddings"])
    base = new_model(cfg["model"], tokenizer)
    pretrain = draw(cfg["pretrain"], lambda: data.pretrain_sample(skills, rng))
    losses = {
        "base": train(
            base, pretrain, cfg["pretrain"], tokenizer.get_vocab(), "pretrain base", progress
        )
    }
    save(base, tokenizer, out / "base")
    # drawn here, one skill after the other, so the stream is consumed as a sequential build
    # consumes it and each fine-tune's data is the same however many processes train them
    jobs = [
        FineTune(
            skill=skill,
            out=out,
            batches=list(draw(cfg["finetune"], lambda s=skill: skill_text(s))),
            model=cfg["model"],
            opt=cfg["finetune"],
            threads=cfg["threads"],
        )
        for skill in skills
    ]
    losses.update(run_finetunes(jobs, workers, progress))
    return {
        "base": "base",
        "foundations": {s: s for s in skills},
        "tasks": write_tasks(out / TASK_DIR, eval_items),
        "task_dir": TASK_DIR,
        "train_loss": {k: round(v, 4) for k, v in losses.items()},
        "n_params": sum(p.numel() for p in base.parameters()),
        "workers": workers,
        "build_seconds": None,
        "quality": None,
    }


# -- quality bar ---------------------------------------------------------------------------------


def quality_check(
    zoo_dir: Path, manifest: Mapping[str, Any], cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """Measure the zoo's quality bar: each foundation beats the base on its own skill by
    `quality_margin`, and at least one generation-1 SLERP merge (the paper's default merge,
    through the pipeline's own merge step) has a positive gain."""
    from tasks.evaluate import evaluate_model
    from tasks.merge import merge_models, preset

    started = time.time()
    tasks = list(manifest["tasks"])
    task_dir = zoo_dir / manifest["task_dir"]

    def score(path: Path) -> dict[str, Any]:
        return evaluate_model(path, tasks, task_dir, batch_size=cfg["eval"]["batch_size"])

    results = {"base": score(zoo_dir / manifest["base"])}
    skills = list(manifest["foundations"])
    for skill in skills:
        results[skill] = score(zoo_dir / manifest["foundations"][skill])
    merges = {}
    with tempfile.TemporaryDirectory(prefix="zoo-merges-") as scratch:
        for i, a in enumerate(skills):
            for b in skills[i + 1 :]:
                out = merge_models(
                    [zoo_dir / a, zoo_dir / b], Path(scratch) / f"{a}-{b}", "slerp", preset("slerp")
                )
                child = score(out)
                gain = child["avg"] - (results[a]["avg"] + results[b]["avg"]) / 2
                merges[f"{a} x {b}"] = {
                    "avg": child["avg"],
                    "gain": gain,
                    "scores": child["scores"],
                }
    margins = {
        s: results[s]["scores"][task_name(s)] - results["base"]["scores"][task_name(s)]
        for s in skills
    }
    return {
        "models": {k: {"scores": v["scores"], "avg": v["avg"]} for k, v in results.items()},
        "own_skill_margin": margins,
        "required_margin": cfg["quality_margin"],
        "merges": merges,
        "pass_own_skill": all(m >= cfg["quality_margin"] for m in margins.values()),
        "pass_positive_merge": any(m["gain"] > 0 for m in merges.values()),
        "seconds": round(time.time() - started, 1),
    }


def format_quality(quality: Mapping[str, Any]) -> str:
    """The quality bar as a text table with PASS/FAIL lines."""
    models = quality["models"]
    tasks = list(next(iter(models.values()))["scores"])
    header = f"{'model':<12}" + "".join(f"{t:>10}" for t in tasks) + f"{'avg':>8}"
    lines = [header, "-" * len(header)]
    for name, res in models.items():
        cells = "".join(f"{res['scores'][t]:>10.3f}" for t in tasks)
        lines.append(f"{name:<12}{cells}{res['avg']:>8.3f}")
    lines += ["", f"{'gen-1 SLERP merge':<18}{'avg':>8}{'gain':>9}"]
    for name, res in quality["merges"].items():
        lines.append(f"{name:<18}{res['avg']:>8.3f}{res['gain']:>+9.3f}")
    margins = ", ".join(f"{s} {m:+.2f}" for s, m in quality["own_skill_margin"].items())
    need = quality.get("required_margin", 0.15)
    lines += [
        "",
        f"{'PASS' if quality['pass_own_skill'] else 'FAIL'}: each foundation beats the base on "
        f"its own skill by >= {need} ({margins})",
        f"{'PASS' if quality['pass_positive_merge'] else 'FAIL'}: at least one generation-1 merge "
        "has a positive gain",
    ]
    return "\n".join(lines)


# -- Prefect task ---------------------------------------------------------------------------------


@task(name="zoo", cache_policy=NO_CACHE, persist_result=False)
def zoo_task(zoo_dir: str, cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The zoo's manifest, building the zoo first if needed (building is idempotent on the config
    hash, so the manifest itself is the cache)."""
    return build_zoo(Path(zoo_dir), cfg, progress=progress)
