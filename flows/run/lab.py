"""The lab: where Algorithm 1's merges, evaluations and kinship questions become Prefect tasks.

It submits every step to the flow's task runner (each with its share of the CPU cores), keeps
what it learns of each model (folder, fingerprint, scores, its parents' kinship) and counts the
work done and reused. It knows nothing of MLflow or the console: each model it finishes goes to
`on_model`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture, as_completed
from tqdm.auto import tqdm

from flows.run.cluster import annotate
from flows.run.inputs import Inputs
from flows.run.runtime import Placement, named
from flows.run.schema import EvolveConf
from tasks.core.device import peak_overlap, settle_heap
from tasks.core.store import remove_partials
from tasks.core.weights import effective_dtype
from tasks.evaluate import evaluate_task, has_samples, import_libraries, samples_wanted
from tasks.kinship import kinship_matrix_task
from tasks.merge import merge_identity, merge_task
from tasks.select import MergePlan, gain


@dataclass
class ModelResult:
    """One evaluated model, as the report and the tracker need it."""

    name: str
    generation: int
    role: str
    parents: tuple[str, str] | None
    path: str
    fingerprint: str
    avg: float | None = None
    gain: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    kinship: dict[str, float] = field(default_factory=dict)  # between its parents, by metric
    merge: dict[str, Any] | None = None  # method and parameters
    reused: bool = False  # merge found in the store
    rebuilt: bool = False  # store entry failed verification and was merged again
    cached: bool = False  # evaluation came from Prefect's cache
    ran: dict[str, dict[str, Any]] = field(default_factory=dict)  # step kind -> where/how long
    samples: dict[str, str] = field(default_factory=dict)  # task -> JSONL of per-sample outputs
    final: dict[str, Any] | None = None  # final benchmark: avg, scores, samples, rank, cached


class Lab:
    def __init__(
        self,
        cfg: EvolveConf,
        inputs: Inputs,
        store_dir: Path,
        placement: Placement,
        on_model: Callable[[ModelResult], None],
    ) -> None:
        self.inputs, self.placement = inputs, placement
        self.merge_cfg, self.kin_cfg = cfg.merge, cfg.kinship
        self.device, self.seed = cfg.device, cfg.seed
        self.verify = cfg.store.verify
        self.progress = cfg.runtime.progress
        self.store_dir = Path(store_dir)
        self.on_model = on_model
        self.models: dict[str, ModelResult] = {
            m.name: ModelResult(m.name, 0, "foundation", None, m.path, m.fingerprint)
            for m in inputs.foundations
        }
        self.counts: Counter[str] = Counter()
        self.steps: list[dict[str, Any]] = []  # where and when each step of this run ran
        self._matrices: dict[tuple[str, ...], dict[str, Any]] = {}
        self._pending: dict[tuple[str, ...], PrefectFuture] = {}  # matrices submitted early
        self._wanted: dict[int, list[str]] = {}  # per settings: entries whose samples are kept
        self.removed_partials = remove_partials(self.store_dir)
        self.removed_partials += remove_partials(Path(inputs.eval_settings["samples_dir"]))
        import_libraries()
        settle_heap()

    # -- Algorithm 1's two questions: averages and kinship ----------------------------------------

    def evaluate_foundations(self) -> dict[str, float]:
        self._submit_matrix()  # the generation's close needs it, not its evaluations
        return self._evaluate(list(self.models), "generation 0")

    def realize(self, plans: list[MergePlan]) -> dict[str, float]:
        """Merge every plan of a generation; each child is evaluated as soon as it is merged."""
        for plan in plans:
            self.models[plan.name] = ModelResult(
                plan.name,
                plan.generation,
                plan.role,
                plan.parents,
                path="",
                fingerprint="",
                kinship={m: self.kinship(*plan.parents, metric=m) for m in self.kin_cfg.metrics},
                merge={
                    "method": self.merge_cfg.method,
                    "parameters": self.merge_cfg.parameters,
                    "model_parameters": self.merge_cfg.model_parameters,
                },
            )
        label = f"generation {plans[0].generation}"
        threads = self.placement.threads(len(plans))
        merges = {self._submit_merge(plan, threads): plan.name for plan in plans}
        evaluations = {}
        with self._bar(2 * len(plans), label) as bar:
            for future in as_completed(list(merges)):
                name = merges[future]
                self._merged(name, future.result())
                bar.update()
                evaluations[self._submit_evaluation(name, threads)] = name
            # every weight of the generation is there: its kinship runs beside its evaluations
            self._submit_matrix()
            return self._collect(evaluations, bar, threads)

    def kinship(self, a: str, b: str, metric: str | None = None) -> float:
        matrix = self.matrix()
        index = matrix["index"]
        return matrix[metric or self.kin_cfg.metric][index[a]][index[b]]

    def mean_kinship(self, names: list[str]) -> float | None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        return sum(self.kinship(a, b) for a, b in pairs) / len(pairs) if pairs else None

    def matrix(self) -> dict[str, Any]:
        """Kinship of every pair of the models merged so far, in one pass over their weights."""
        names = self._merged_names()
        if names not in self._matrices:
            self._submit_matrix()
            future = self._pending.pop(names)
            result = future.result()
            self.counts["kinship_matrices"] += 1
            if future.state.name != "Cached":
                self.counts["kinship_seconds"] += result["ran"]["seconds"]
                self.steps.append(result["ran"])
            self._matrices[names] = {
                **result,
                "names": list(names),
                "index": {n: i for i, n in enumerate(names)},
            }
        return self._matrices[names]

    def _merged_names(self) -> tuple[str, ...]:
        return tuple(n for n, m in self.models.items() if m.fingerprint)

    def _submit_matrix(self) -> None:
        """Submit the kinship matrix of the models merged so far, unless it is on its way;
        `matrix()` waits for it."""
        names = self._merged_names()
        if names in self._pending or names in self._matrices:
            return
        base = self.inputs.base
        generation = max(self.models[n].generation for n in names)
        step = named(kinship_matrix_task, f"kinship gen {generation} ({len(names)} models)")
        with annotate(self.placement.resources.get("kinship")):
            future = step.submit(
                [self.models[n].path for n in names],
                [self.models[n].fingerprint for n in names],
                base.path,
                base.fingerprint,
                asdict(self.kin_cfg),  # plain data: Prefect persists the task's inputs
                self.device,
                self.placement.threads(1),
            )
        self._pending[names] = future

    # -- steps ------------------------------------------------------------------------------------

    def _submit_merge(self, plan: MergePlan, threads: int | None) -> PrefectFuture:
        merge = self.models[plan.name].merge
        params = {"parameters": merge["parameters"], "model_parameters": merge["model_parameters"]}
        parents = [self.models[p].path for p in plan.parents]
        # the id holds the dtype mergekit will use: `auto` read from the parents' headers
        dtype = effective_dtype(self.merge_cfg.dtype, [Path(p) for p in parents])
        merge_id = merge_identity(
            [self.models[p].fingerprint for p in plan.parents],
            merge["method"],
            params,
            base_fingerprint=self.inputs.base.fingerprint,
            dtype=dtype,
            seed=self.seed,
        )
        out_dir = self.store_dir / merge_id
        self.models[plan.name].path = str(out_dir)
        request = {
            "merge_id": merge_id,
            "parents": parents,
            "out_dir": str(out_dir),
            "method": merge["method"],
            "params": params,
            "base": self.inputs.base.path,
            "dtype": dtype,
            "device": self.device,
            "seed": self.seed,
            "options": self.merge_cfg.options,
            "verify": self.verify,
        }
        step = named(merge_task, f"merge {plan.name} = {' x '.join(plan.parents)}")
        with annotate(self.placement.resources.get("merge")):
            return step.submit(request, threads)

    def _merged(self, name: str, result: Mapping[str, Any]) -> None:
        model = self.models[name]
        model.fingerprint = result["fingerprint"]
        model.reused, model.rebuilt = result["reused"], bool(result.get("rebuilt"))
        model.ran["merge"] = result["ran"]
        self.steps.append(result["ran"])
        self.counts["merges"] += 1
        self.counts["merges_reused"] += model.reused
        self.counts["merge_seconds"] += result["ran"]["seconds"]

    def _submit_evaluation(
        self,
        name: str,
        threads: int | None,
        settings: Mapping[str, Any] | None = None,
        refresh: bool = False,
    ) -> PrefectFuture:
        model = self.models[name]
        settings = settings or self.inputs.eval_settings
        step = evaluate_task.with_options(refresh_cache=True) if refresh else evaluate_task
        final = settings is self.inputs.final_settings
        step = named(step, f"evaluate {name}{' (final benchmark)' if final else ''}")
        with annotate(self.placement.resources.get("evaluate")):
            return step.submit(model.path, model.fingerprint, settings, threads)

    def _evaluated(
        self,
        name: str,
        future: PrefectFuture,
        threads: int | None,
        settings: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """An evaluation's result and whether it came from the cache. The sample log is not part
        of the cache key (it changes no score): a cached result made without the samples now
        wanted, or whose files are gone, is evaluated again, replacing the cached entry."""
        settings = settings or self.inputs.eval_settings
        result, cached = future.result(), future.state.name == "Cached"
        if cached and not has_samples(result, self._samples_wanted(settings)):
            future = self._submit_evaluation(name, threads, settings, refresh=True)
            result, cached = future.result(), False
            self.counts["evals_resampled"] += 1
        return result, cached

    def _samples_wanted(self, settings: Mapping[str, Any]) -> list[str]:
        if id(settings) not in self._wanted:
            self._wanted[id(settings)] = samples_wanted(settings)
        return self._wanted[id(settings)]

    def _evaluate(self, names: list[str], label: str) -> dict[str, float]:
        threads = self.placement.threads(len(names))
        futures = {self._submit_evaluation(n, threads): n for n in names}
        with self._bar(len(names), label) as bar:
            return self._collect(futures, bar, threads)

    def _finished(
        self,
        futures: Mapping[PrefectFuture, str],
        bar: tqdm,
        threads: int | None,
        settings: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any], bool]]:
        """Each evaluation as it finishes: the model's name, the result and whether it came from
        the cache. The ones that ran count towards the run's evaluation time and step records (a
        cached result carries the record of the run that made it)."""
        for future in as_completed(list(futures)):
            name = futures[future]
            result, cached = self._evaluated(name, future, threads, settings)
            if not cached:
                self.counts["eval_seconds"] += result["ran"]["seconds"]
                self.steps.append(result["ran"])
            bar.update()
            yield name, result, cached

    def _collect(
        self, futures: Mapping[PrefectFuture, str], bar: tqdm, threads: int | None
    ) -> dict[str, float]:
        averages = {}
        for name, result, cached in self._finished(futures, bar, threads):
            model = self.models[name]
            model.avg, model.scores = result["avg"], result["scores"]
            model.samples = dict(result.get("eval_samples") or {})
            model.cached = cached
            model.ran["evaluate"] = result["ran"]
            if model.parents:
                model.gain = gain(model.avg, [self.models[p].avg for p in model.parents])
            self.counts["evals"] += 1
            self.counts["evals_cached"] += cached
            averages[name] = model.avg
            self.on_model(model)
        return averages

    # -- the final benchmark ----------------------------------------------------------------------

    def evaluate_final(self, names: list[str]) -> list[ModelResult]:
        """Evaluate `names` (the run's best, best first) on the final benchmark (final_eval),
        through the same cached evaluate step; each model's `final` holds what it scored."""
        settings = self.inputs.final_settings
        if settings is None:
            raise ValueError("evaluate_final: no final benchmark configured (final_eval)")
        threads = self.placement.threads(len(names))
        futures = {self._submit_evaluation(n, threads, settings): n for n in names}
        with self._bar(len(names), "final benchmark") as bar:
            for name, result, cached in self._finished(futures, bar, threads, settings):
                self.models[name].final = {
                    "rank": names.index(name) + 1,
                    "avg": result["avg"],
                    "scores": result["scores"],
                    "samples": dict(result.get("eval_samples") or {}),
                    "cached": cached,
                    "ran": result["ran"],
                }
                self.counts["final_evals"] += 1
                self.counts["final_evals_cached"] += cached
        return [self.models[n] for n in names]

    def _bar(self, total: int, label: str) -> tqdm:
        return tqdm(total=total, desc=label, unit="step", leave=False, disable=not self.progress)

    def peak_concurrency(self) -> int:
        """The most steps of this run that ran at once, from the steps' own records."""
        return peak_overlap(self.steps)

    def where(self) -> dict[str, dict[str, Any]]:
        """Per step kind: how many ran, their seconds, and the distinct places they ran."""
        out: dict[str, dict[str, Any]] = {}
        for ran in self.steps:
            kind = out.setdefault(ran["kind"], {"count": 0, "seconds": 0.0, "where": []})
            kind["count"] += 1
            kind["seconds"] = round(kind["seconds"] + ran["seconds"], 3)
            place = {k: ran.get(k) for k in ("worker", "host", "pid", "device")}
            if place not in kind["where"]:
                kind["where"].append(place)
        return out
