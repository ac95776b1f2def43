"""Entry point: `python -m flows.evolve +experiment=greedy_kinship`.

Compose the config (Hydra), validate it before any work, then run the evolution flow (Prefect).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from flows.runtime import prefect_runtime, quiet_logs
from flows.schema import ConfigError, validate


def run(cfg: DictConfig) -> dict:
    """Validate `cfg` and run the evolution; returns the run summary."""
    settings = validate(cfg)
    plain = OmegaConf.to_container(settings, resolve=True)
    with prefect_runtime(plain["paths"]):
        from flows.pipeline import evolve_flow

        return evolve_flow(plain)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    quiet_logs()
    try:
        summary = run(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{summary['table']}\n")
    print(
        f"stopped: {summary['stop_reason']}; best {summary['best_model']} "
        f"avg={summary['best_avg']:.4f} (best foundation {summary['best_foundation_avg']:.4f}); "
        f"outputs in {summary['outputs']['table'].rsplit('/', 1)[0]}"
    )


if __name__ == "__main__":
    main()
