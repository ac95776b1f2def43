"""Algorithm 1 replayed against the paper's Table 2 (greedy strategy, k = 3)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tasks.select import Evolution, MergePlan, StopRules, run_evolution

PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "paper"


def _table(name: str) -> list[dict[str, str]]:
    path = PAPER / name
    if not path.is_file():
        pytest.skip(f"paper tables not found at {PAPER}")
    with path.open() as fh:
        return list(csv.DictReader(fh))


class TableEvaluator:
    """Evaluates a merge by looking up the paper's row with the same parents.

    Our names map to the paper's: a child is identified by its parents' paper names, so ids may
    differ within a generation and the replay still finds the right row.
    """

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.by_parents = {frozenset(r["parents"].split("+")): r for r in rows if r["parents"]}
        self.avg = {r["model"]: float(r["avg"]) for r in rows}
        self.paper_name: dict[str, str] = {r["model"]: r["model"] for r in rows if not r["parents"]}

    def __call__(self, plans: list[MergePlan]) -> dict[str, float]:
        out = {}
        for plan in plans:
            key = frozenset(self.paper_name[p] for p in plan.parents)
            row = self.by_parents.get(key)
            if row is None:
                raise AssertionError(f"{plan.name}: the paper never merged {sorted(key)}")
            self.paper_name[plan.name] = row["model"]
            out[plan.name] = float(row["avg"])
        return out


def test_greedy_replays_table2_parent_pairs_and_stop() -> None:
    rows = _table("table2_greedy.csv")
    foundations = [r["model"] for r in rows if r["generation"] == "0"]
    evo = Evolution(
        foundations, k=3, strategy="greedy", stop=StopRules(until_stable=True, patience=2)
    )
    evaluator = TableEvaluator(rows)
    evo.record({name: evaluator.avg[name] for name in foundations})
    reason = run_evolution(evo, evaluator)

    ours: dict[int, set[frozenset[str]]] = {}
    for member in evo.members.values():
        if member.parents:
            pair = frozenset(evaluator.paper_name[p] for p in member.parents)
            ours.setdefault(member.generation, set()).add(pair)
    paper: dict[int, set[frozenset[str]]] = {}
    for r in rows:
        if r["parents"]:
            paper.setdefault(int(r["generation"]), set()).add(frozenset(r["parents"].split("+")))

    assert ours == paper
    assert len(ours[3]) == 2  # the third pair of S was merged in generation 2 already
    assert evo.generation == 4
    assert reason == "no new best for 2 generations"
    # gains reproduce the table's within its rounding
    for member in evo.members.values():
        if member.parents:
            row = next(r for r in rows if r["model"] == evaluator.paper_name[member.name])
            assert evo.gain(member.name) == pytest.approx(float(row["gain"]), abs=0.011)


def test_model_2_1_is_open_chat_with_model_1_3() -> None:
    rows = _table("table2_greedy.csv")
    foundations = [r["model"] for r in rows if r["generation"] == "0"]
    evo = Evolution(foundations, k=3, strategy="greedy", stop=StopRules(max_generations=2))
    evaluator = TableEvaluator(rows)
    evo.record({name: evaluator.avg[name] for name in foundations})
    run_evolution(evo, evaluator)
    assert evaluator.paper_name["model-2-1"] == "model-2-1"
    parents = {evaluator.paper_name[p] for p in evo.members["model-2-1"].parents}
    assert parents == {"Open-chat", "model-1-3"}


def _kinship_from(values: dict[frozenset[str], float]):
    return lambda a, b: values[frozenset((a, b))]


def test_exploration_merges_best_with_lowest_kinship_partner_not_merged_before() -> None:
    evo = Evolution(["a", "b", "c"], k=2, strategy="greedy_kinship", partner="lowest")
    evo.record({"a": 0.5, "b": 0.6, "c": 0.4})
    evo.add(evo.plan_next())
    evo.record({"model-1-1": 0.7, "model-1-2": 0.55, "model-1-3": 0.45})
    evo.close_generation()
    # best is model-1-1 (b x a); S = {model-1-1, b}
    kin = {
        frozenset(("model-1-1", x)): v
        for x, v in {"a": 0.9, "b": 0.95, "c": 0.1, "model-1-2": 0.2, "model-1-3": 0.05}.items()
    }
    plans = evo.plan_next(_kinship_from(kin))
    assert [p.role for p in plans] == ["pair", "exploration"]
    assert set(plans[0].parents) == {"model-1-1", "b"}
    assert plans[1] == MergePlan("model-2-exp", 2, ("model-1-1", "model-1-3"), "exploration")

    evo_high = Evolution(["a", "b", "c"], k=2, strategy="greedy_kinship", partner="highest")
    evo_high.members = evo.members
    evo_high.generation = 1
    high = evo_high.plan_next(_kinship_from(kin))[-1]
    # b has the highest kinship but is merged in this generation's pair already; a is next
    assert high.parents == ("model-1-1", "a")


def test_ed_is_a_distance_for_partner_choice() -> None:
    evo = Evolution(["a", "b", "c"], k=2, strategy="greedy_kinship", partner="lowest")
    evo.record({"a": 0.5, "b": 0.6, "c": 0.4})
    evo.add(evo.plan_next())
    evo.record({"model-1-1": 0.7, "model-1-2": 0.55, "model-1-3": 0.45})
    evo.close_generation()
    ed = {"a": 1.0, "b": 1.0, "c": 9.0, "model-1-2": 2.0, "model-1-3": 3.0}
    kin = {frozenset(("model-1-1", x)): v for x, v in ed.items()}
    plans = evo.plan_next(_kinship_from(kin), metric="ed")
    assert plans[-1].parents == ("model-1-1", "c")  # farthest = lowest kinship


def test_stop_rules() -> None:
    evo = Evolution(["a", "b", "c", "d"], k=2, strategy="greedy", stop=StopRules(until_stable=True))
    evo.record({"a": 0.5, "b": 0.6, "c": 0.4, "d": 0.3})

    def flat(plans: list[MergePlan]) -> dict[str, float]:
        # only the c x d merge enters S; later merges never do
        return {p.name: 0.9 if set(p.parents) == {"c", "d"} else 0.1 for p in plans}

    reason = run_evolution(evo, flat)
    assert evo.generation == 2
    assert reason == "top-2 set unchanged in generation 2"

    evo = Evolution(["a", "b"], k=2, strategy="greedy", stop=StopRules(until_stable=False))
    evo.record({"a": 0.5, "b": 0.6})
    assert run_evolution(evo, flat) == "no new pair to merge after generation 1"

    evo = Evolution(
        ["a", "b", "c"],
        k=3,
        strategy="greedy",
        stop=StopRules(until_stable=False, max_generations=3),
    )
    evo.record({"a": 0.5, "b": 0.6, "c": 0.4})
    counter = iter(range(100))
    assert run_evolution(evo, lambda ps: {p.name: 1 + next(counter) for p in ps}) == (
        "reached max_generations=3"
    )

    evo = Evolution(
        ["a", "b", "c"],
        k=3,
        strategy="greedy",
        stop=StopRules(until_stable=False, kinship_threshold=0.9),
    )
    evo.record({"a": 0.5, "b": 0.6, "c": 0.4})
    means = iter([0.1, 0.5, 0.95, 0.99])
    reason = run_evolution(
        evo, lambda ps: {p.name: 1 + next(counter) for p in ps}, mean_kinship=lambda s: next(means)
    )
    assert evo.generation == 2 and reason.startswith("mean kinship within S (0.950)")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"k": 1}, "strategy.k"),
        ({"strategy": "random"}, "strategy.name"),
        ({"partner": "middle"}, "strategy.partner"),
    ],
)
def test_invalid_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        Evolution(["a", "b", "c"], **kwargs)


def test_duplicate_foundation_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Evolution(["a", "b", "a"])
