"""Select step: Top-k Greedy Merging with Model Kinship (the paper's Algorithm 1), as pure logic.

`Evolution` holds the population and answers three questions: which merges does the next
generation make, which models form the top-k set S, and should evolution stop. It knows
nothing about weights, Prefect or MLflow; the flow feeds it averages and kinship values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["foundation", "pair", "exploration"]
STRATEGIES = ("greedy", "greedy_kinship")
PARTNERS = ("lowest", "highest")
KINSHIP_METRICS = ("pcc", "cs", "ed")  # the paper's three; ED alone is a distance


@dataclass(frozen=True)
class MergePlan:
    """One merge the strategy asks for: `parents[0]` is the better parent (SLERP's t=0 side)."""

    name: str
    generation: int
    parents: tuple[str, str]
    role: Role


@dataclass
class Member:
    name: str
    generation: int
    parents: tuple[str, str] | None
    role: Role
    avg: float | None = None


@dataclass(frozen=True)
class StopRules:
    """strategy.stop; its values come from conf/strategy/ (no defaults here to disagree)."""

    until_stable: bool  # Algorithm 1: stop when S no longer changes
    patience: int | None  # stop after this many generations without a new best
    max_generations: int | None
    kinship_threshold: float | None  # stop when mean kinship within S passes this


@dataclass
class GenerationRecord:
    generation: int
    top_k: list[str]
    best: str
    best_avg: float
    mean_avg_top_k: float
    mean_kinship_top_k: float | None = None


def check_settings(
    strategy: str, partner: str, k: int, foundations: Sequence[str] | None = None
) -> None:
    """The rules a strategy's settings must follow; ValueError names the key that breaks one.

    The config schema calls this before any work, and `Evolution` on construction.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy.name: '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if partner not in PARTNERS:
        raise ValueError(f"strategy.partner: '{partner}' is not one of {', '.join(PARTNERS)}")
    if k < 2:
        raise ValueError(f"strategy.k: must be at least 2, got {k}")
    if foundations is None:
        return
    if len(set(foundations)) != len(foundations):
        raise ValueError(f"models.foundations: a model is listed twice: {list(foundations)}")
    if len(foundations) < 2:
        raise ValueError("models.foundations: at least two foundation models are needed")
    if k > len(foundations):
        raise ValueError(f"strategy.k: {k} is larger than the {len(foundations)} foundation models")


def gain(avg: float | None, parent_avgs: Sequence[float | None]) -> float | None:
    """The paper's merge gain: avg(child) − mean(avg of its parents); None if any is unknown."""
    if avg is None or not parent_avgs or any(p is None for p in parent_avgs):
        return None
    return avg - sum(parent_avgs) / len(parent_avgs)


def similarity(metric: str, value: float) -> float:
    """Kinship as a similarity: ED is a distance, so larger ED means less related."""
    return -value if metric == "ed" else value


@dataclass
class Evolution:
    foundations: Sequence[str]
    k: int  # strategy.k, .name, .partner, .stop: values from conf/strategy/
    strategy: str
    partner: str
    stop: StopRules
    members: dict[str, Member] = field(default_factory=dict)
    merged_pairs: set[frozenset[str]] = field(default_factory=set)
    history: list[GenerationRecord] = field(default_factory=list)
    generation: int = 0

    def __post_init__(self) -> None:
        check_settings(self.strategy, self.partner, self.k, self.foundations)
        for name in self.foundations:
            self.members.setdefault(name, Member(name, 0, None, "foundation"))

    # -- population -------------------------------------------------------------------------

    def record(self, averages: Mapping[str, float]) -> None:
        """Store evaluated averages (foundations or merged models)."""
        for name, avg in averages.items():
            if name not in self.members:
                raise KeyError(f"unknown model '{name}'")
            if avg is None or not math.isfinite(avg):
                raise ValueError(f"average of '{name}' is not a finite number: {avg}")
            self.members[name].avg = float(avg)

    def evaluated(self) -> list[Member]:
        return [m for m in self.members.values() if m.avg is not None]

    def top_k(self) -> list[str]:
        """S: the k best models so far, best first (ties: earlier generation, then name)."""
        return self.ranked(self.k)

    def ranked(self, n: int | None = None) -> list[str]:
        """The n best models so far (all: None), best first, ordered as `top_k` orders them."""
        ranked = sorted(self.evaluated(), key=lambda m: (-m.avg, m.generation, m.name))
        return [m.name for m in ranked[:n]]

    def best(self) -> Member:
        return self.members[self.top_k()[0]]

    # -- planning ---------------------------------------------------------------------------

    def _ordered(self, a: str, b: str) -> tuple[str, str]:
        ma, mb = self.members[a], self.members[b]
        key_a = (-(ma.avg or 0.0), ma.generation, a)
        key_b = (-(mb.avg or 0.0), mb.generation, b)
        return (a, b) if key_a <= key_b else (b, a)

    def plan_next(
        self, kinship: Callable[[str, str], float] | None, metric: str
    ) -> list[MergePlan]:
        """The merges of the next generation (empty when nothing new can be merged).

        Generation 1 merges every pair of foundation models. Later generations merge every pair
        within S not merged before, ranked by the pair's mean average; with the kinship strategy
        one exploration merge pairs the best model of S with the model of the previous
        population of lowest (or highest) kinship to it that it was not merged with before.
        """
        gen = self.generation + 1
        if gen == 1:
            candidates = list(itertools.combinations(self.foundations, 2))
        else:
            top = self.top_k()
            candidates = [
                pair
                for pair in itertools.combinations(top, 2)
                if frozenset(pair) not in self.merged_pairs
            ]
        pairs = [self._ordered(a, b) for a, b in candidates]
        pairs.sort(key=lambda p: -(self.members[p[0]].avg or 0) - (self.members[p[1]].avg or 0))
        plans = [
            MergePlan(f"model-{gen}-{i}", gen, pair, "pair") for i, pair in enumerate(pairs, 1)
        ]
        if gen > 1 and self.strategy == "greedy_kinship":
            exploration = self._exploration(gen, {frozenset(p) for p in pairs}, kinship, metric)
            if exploration is not None:
                plans.append(exploration)
        return plans

    def _exploration(
        self,
        gen: int,
        planned: set[frozenset[str]],
        kinship: Callable[[str, str], float] | None,
        metric: str,
    ) -> MergePlan | None:
        if kinship is None:
            raise ValueError("the greedy_kinship strategy needs a kinship function")
        best = self.best().name
        candidates = [
            m.name
            for m in self.evaluated()
            if m.name != best
            and frozenset((best, m.name)) not in self.merged_pairs
            and frozenset((best, m.name)) not in planned
        ]
        if not candidates:
            return None
        sign = 1.0 if self.partner == "lowest" else -1.0
        partner = min(
            candidates,
            key=lambda c: (
                sign * similarity(metric, kinship(best, c)),
                self.members[c].generation,
                c,
            ),
        )
        return MergePlan(f"model-{gen}-exp", gen, (best, partner), "exploration")

    def add(self, plans: Sequence[MergePlan]) -> None:
        """Register a generation's merges (before they are evaluated)."""
        if not plans:
            raise ValueError("a generation needs at least one merge")
        gens = {p.generation for p in plans}
        if gens != {self.generation + 1}:
            raise ValueError(f"plans are not for generation {self.generation + 1}: {sorted(gens)}")
        for plan in plans:
            self.members[plan.name] = Member(plan.name, plan.generation, plan.parents, plan.role)
            self.merged_pairs.add(frozenset(plan.parents))
        self.generation += 1

    # -- stopping ---------------------------------------------------------------------------

    def close_generation(self, mean_kinship_top_k: float | None = None) -> GenerationRecord:
        """Snapshot S after the current generation's models are evaluated (0: foundations)."""
        pending = [m.name for m in self.members.values() if m.avg is None]
        if pending:
            raise ValueError(f"models not evaluated yet: {pending}")
        top = self.top_k()
        best = self.members[top[0]]
        record = GenerationRecord(
            generation=self.generation,
            top_k=top,
            best=best.name,
            best_avg=float(best.avg),
            mean_avg_top_k=sum(self.members[n].avg for n in top) / len(top),
            mean_kinship_top_k=mean_kinship_top_k,
        )
        self.history.append(record)
        return record

    def stop_reason(self, metric: str) -> str | None:
        """Why evolution stops after the last closed generation, or None to go on."""
        if not self.history:
            return None
        last = self.history[-1]
        rules = self.stop
        if rules.max_generations is not None and last.generation >= rules.max_generations:
            return f"reached max_generations={rules.max_generations}"
        # S is first formed by generation 1, so generation 0 (foundations only) never counts
        if rules.until_stable and len(self.history) >= 2 and self.history[-2].generation >= 1:
            if set(self.history[-2].top_k) == set(last.top_k):
                return f"top-{self.k} set unchanged in generation {last.generation}"
        if rules.patience is not None and len(self.history) > rules.patience:
            before = self.history[-rules.patience - 1].best_avg
            if all(h.best_avg <= before for h in self.history[-rules.patience :]):
                return f"no new best for {rules.patience} generations"
        if rules.kinship_threshold is not None and last.mean_kinship_top_k is not None:
            sim = similarity(metric, last.mean_kinship_top_k)
            if sim >= similarity(metric, rules.kinship_threshold):
                return (
                    f"mean kinship within S ({last.mean_kinship_top_k:.3f}) passed "
                    f"the threshold {rules.kinship_threshold}"
                )
        return None

    def gain(self, name: str) -> float | None:
        """avg(child) - mean(avg of its parents); None for foundations."""
        member = self.members[name]
        if member.parents is None:
            return None
        return gain(member.avg, [self.members[p].avg for p in member.parents])


def run_evolution(
    evolution: Evolution,
    realize: Callable[[list[MergePlan]], Mapping[str, float]],
    kinship: Callable[[str, str], float] | None,
    metric: str,
    mean_kinship: Callable[[list[str]], float] | None = None,
    on_generation: Callable[[Evolution, list[MergePlan], GenerationRecord], None] | None = None,
) -> str:
    """Drive Algorithm 1: plan, realize (merge + evaluate, returns averages), close, check stop.

    Foundation averages must be recorded before. Returns the stop reason.
    """
    if not evolution.history:
        top = evolution.top_k()
        record = evolution.close_generation(mean_kinship(top) if mean_kinship else None)
        if on_generation is not None:
            on_generation(evolution, [], record)
    while True:
        plans = evolution.plan_next(kinship, metric)
        if not plans:
            return f"no new pair to merge after generation {evolution.generation}"
        evolution.add(plans)
        evolution.record(realize(plans))
        top = evolution.top_k()
        record = evolution.close_generation(mean_kinship(top) if mean_kinship else None)
        if on_generation is not None:
            on_generation(evolution, plans, record)
        reason = evolution.stop_reason(metric)
        if reason is not None:
            return reason
