"""Config composition and validation: bad values fail before any work, naming the key."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from flows.run.schema import ConfigError, EvolveConf, validate
from tasks.merge import merge_methods, preset

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["greedy", "greedy_kinship"])
def test_experiments_compose_and_validate(experiment: str) -> None:
    cfg = validate(_compose(f"+experiment={experiment}"))
    assert cfg.strategy.name == experiment
    assert cfg.run_name == experiment
    assert cfg.models.base == "zoo:base"
    assert cfg.merge.method == "slerp"
    assert cfg.merge.parameters["t"][0]["value"] == [0, 0.5, 0.3, 0.7, 1]


PRESETS = sorted(p.stem for p in (Path(CONF) / "merge").glob("*.yaml"))


def test_a_preset_for_every_method_mergekit_registers() -> None:
    """`merge=NAME` selects any registered method whole: a mergekit upgrade that registers a
    method fails here until conf/merge/ has its preset."""
    assert PRESETS == list(merge_methods())


@pytest.mark.parametrize("method", merge_methods())
def test_merge_name_selects_the_method_with_its_own_parameters(method: str) -> None:
    """The method and its preset's parameters only (no leftover slerp `t`); validated, or refused
    with mergekit's reason (passthrough takes one model, a run merges pairs)."""
    cfg = _compose(f"merge={method}")
    assert cfg.merge.method == method
    assert preset(method) == {
        "parameters": OmegaConf.to_container(cfg.merge.parameters),
        "model_parameters": OmegaConf.to_container(cfg.merge.model_parameters),
    }
    try:
        validate(cfg)
    except ConfigError as exc:
        assert str(exc).startswith(f"merge.method: {method} cannot merge 2 models ("), str(exc)


def test_debug_config_selects_micro_zoo() -> None:
    cfg = validate(_compose("+experiment=greedy", "+debug=micro"))
    assert cfg.strategy.stop.max_generations == 2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("kinship.metric=jaccard", "kinship.metric"),
        ("kinship.metrics=[pcc,foo]", "kinship.metrics[1]"),
        ("merge.method=frankenmerge", "merge.method"),
        ("strategy.name=random", "strategy.name"),
        ("strategy.k=1", "strategy.k"),
        ("strategy.partner=median", "strategy.partner"),
        ("strategy.k=three", "strategy.k"),
        ("+strategy.temperature=1", "strategy.temperature"),
        ("kinship.vocab_mismatch=ignore", "kinship.vocab_mismatch"),
        ("device=tpu", "device"),
        ("eval.tasks=[]", "eval.tasks"),
    ],
)
def test_invalid_values_name_the_key(override: str, key: str) -> None:
    cfg = _compose("+experiment=greedy_kinship", override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_merge_group_fails_in_hydra() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        _compose("merge=frankenmerge")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("models.foundations=[zoo:add,zoo:add]", "models.foundations: a model is listed twice"),
        ("models.foundations=[zoo:add]", "models.foundations: at least two"),
        ("strategy.k=4", "strategy.k: 4 is larger than the 3 foundation models"),
    ],
)
def test_population_checks_name_the_key(override: str, key: str) -> None:
    """Checks that need the expanded foundation list (`zoo:*` is the zoo's skills) run before
    Prefect starts, from the same rules Algorithm 1 enforces."""

    from flows.run.inputs import check_inputs

    cfg = validate(_compose("+experiment=greedy_kinship", "+debug=micro", override))
    with pytest.raises(ConfigError, match=key):
        check_inputs(cfg)


def test_runtimes_compose_and_validate() -> None:
    assert validate(_compose("runtime=local")).runtime.name == "local"
    cfg = validate(_compose("runtime=dask", "runtime.dask.worker_resources={GPU: 1}"))
    assert cfg.runtime.name == "dask" and cfg.runtime.dask.worker_resources == {"GPU": 1}
    with pytest.raises(ConfigError, match="runtime.dask.resources"):
        validate(_compose("runtime=dask", "+runtime.dask.resources.train={GPU: 1}"))
    with pytest.raises(ConfigError, match="runtime.name"):
        validate(_compose("runtime.name=ray"))


def test_an_external_cluster_needs_one_prefect_api(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.run.cluster import dask_task_runner

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    dask = validate(_compose("runtime=dask", "runtime.dask.address=tcp://127.0.0.1:8786"))
    with pytest.raises(ConfigError, match="PREFECT_API_URL"):
        dask_task_runner(dask.runtime.dask)


def test_peak_overlap_counts_steps_running_at_once() -> None:
    from tasks.core.device import peak_overlap

    def step(start: float, end: float) -> dict:
        return {"started": start, "ended": end}

    assert peak_overlap([]) == 0
    assert peak_overlap([step(0, 1), step(1, 2), step(2, 3)]) == 1  # back to back
    assert peak_overlap([step(0, 3), step(1, 2), step(1.5, 4), step(5, 6)]) == 3


def test_a_settled_heap_still_releases_what_a_step_loaded() -> None:
    """After settle_heap() the libraries' objects are out of the collector's sight, and a step's
    cyclic garbage (a tensor held in a reference cycle) is still freed when the step ends."""
    import gc
    import weakref

    import torch

    from tasks.core.device import running_step, settle_heap

    try:
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with running_step("merge", 1):
            holder: dict = {"tensor": torch.zeros(1000)}
            holder["self"] = holder  # a cycle: only the collector frees it
            alive = weakref.ref(holder["tensor"])
            del holder
            assert alive() is not None
        assert alive() is None
        assert gc.get_freeze_count() <= frozen  # a step freezes nothing more
    finally:
        gc.unfreeze()


def _fields(schema: type) -> list[tuple[str, dataclasses.Field]]:
    """Every field of `schema` and of the dataclasses it nests, keyed by its config path."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        out.append((f.name, f))
        nested = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if is_dataclass(t)]
        out += [(f"{f.name}.{key}", g) for t in nested for key, g in _fields(t)]
    return out


def test_schema_supplies_no_second_default() -> None:
    """conf/ holds every value: no schema field has a default of its own that could disagree."""
    with_default = [
        key
        for key, f in _fields(EvolveConf)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


@pytest.mark.parametrize("runtime", ["local", "dask"])
def test_a_key_conf_does_not_set_is_an_error_naming_it(runtime: str) -> None:
    """Every runtime composes completely; a key missing from conf/ is named, not filled in."""
    cfg = _compose(f"runtime={runtime}")
    validate(cfg)
    with open_dict(cfg):
        del cfg.strategy.stop["patience"]
    with pytest.raises(ConfigError, match=r"^strategy\.stop\.patience: missing"):
        validate(cfg)
