"""The evolution flow: Top-k Greedy Merging with Model Kinship (the paper's Algorithm 1).

Algorithm 1 itself is pure logic in tasks/select.py. Here: prepare the inputs
(flows/run/inputs.py), open the recorder (flows/run/record.py: MLflow, results folder, console),
let the lab (flows/run/lab.py) answer Algorithm 1's questions with Prefect tasks, evaluate the
best models on the final benchmark when one is configured (final_eval), and finish.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import TagsContext

from flows.run.inputs import prepare_inputs, readable_by_workers, run_paths
from flows.run.lab import Lab
from flows.run.record import Recorder
from flows.run.runtime import place_steps, record_server_pids
from flows.run.schema import EvolveConf
from tasks.core.weights import model_bytes
from tasks.select import Evolution, StopRules, run_evolution


@flow(name="evolve", log_prints=False, persist_result=False)
def evolve_flow(cfg: EvolveConf) -> dict[str, Any]:
    """Evolve the configured foundation models by Top-k Greedy Merging (with kinship)."""
    # The run's tags (flows/evolve.py) mark the flow run, not its steps: Prefect asks its server
    # for the concurrency slots of each tag of a task run before the step starts, a round trip
    # per step that kept both workers idle for seconds per generation (measured: flows/run/
    # lab.py's steps waited in acquire_concurrency_slots_with_lease ~10 s of a 50 s run)
    with TagsContext(current_tags=set()):
        return _evolve(cfg)


def _evolve(cfg: EvolveConf) -> dict[str, Any]:
    paths = run_paths(cfg)
    record_server_pids(paths["prefect_home"])
    inputs = prepare_inputs(cfg, paths)
    models = [inputs.base, *inputs.foundations]
    largest = max(model_bytes(Path(m.path)) for m in models)
    placement = place_steps(cfg, readable_by_workers(paths, inputs), largest)

    with Recorder(cfg, paths, inputs) as recorder:
        lab = Lab(cfg, inputs, paths["store_dir"], placement, on_model=recorder.model_done)
        recorder.watch(lab)

        strategy = cfg.strategy
        evolution = Evolution(
            [m.name for m in inputs.foundations],
            k=strategy.k,
            strategy=strategy.name,
            partner=strategy.partner,
            stop=StopRules(**asdict(strategy.stop)),
        )
        evolution.record(lab.evaluate_foundations())
        reason = run_evolution(
            evolution,
            lab.realize,
            kinship=lab.kinship,
            metric=cfg.kinship.metric,
            mean_kinship=lab.mean_kinship,
            on_generation=recorder.generation_done,
        )
        if inputs.final_settings is not None:
            # the search's winners on the full benchmark (e.g. searched on eval=open_llm_tiny)
            recorder.final_done(lab.evaluate_final(evolution.ranked(inputs.final_top_k)))
        return recorder.finish(reason)
