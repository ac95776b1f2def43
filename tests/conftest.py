"""Shared fixtures: offline environment, the micro zoo (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
)


def compose_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro zoo, built with the project's own builder and config."""
    from omegaconf import OmegaConf

    from tasks.zoo import build_zoo

    zoo_dir = tmp_path_factory.mktemp("zoo") / "zoo"
    cfg = compose_config("+debug=micro")
    build_zoo(zoo_dir, OmegaConf.to_container(cfg.zoo, resolve=True), progress=False)
    return zoo_dir
