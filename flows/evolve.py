"""Entry point: `python -m flows.evolve +experiment=greedy_kinship`.

Compose the config (Hydra), validate it before any work, then run the evolution flow (Prefect).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from flows.runtime import prefect_runtime, quiet_logs
from flows.schema import ConfigError, validate
from tasks.fetch import is_zoo_ref, resolve


def early_checks(cfg: dict) -> None:
    """Checks that need no zoo and no model weights, so a wrong input fails in seconds."""
    models = cfg["models"]
    refs = [models["base"], *models["foundations"]]
    for ref in refs:
        if not is_zoo_ref(ref):
            resolve(
                ref,
                root=Path(cfg["paths"]["root"]).resolve(),
                allow_pickle=models["allow_pickle"],
                trust_remote_code=models["trust_remote_code"],
            )
    n_foundations = sum(
        len(cfg["zoo"].get("skills", [])) if ref == "zoo:*" else 1 for ref in models["foundations"]
    )
    if cfg["strategy"]["k"] > n_foundations:
        raise ConfigError(
            f"strategy.k: {cfg['strategy']['k']} is larger than the "
            f"{n_foundations} foundation models"
        )


def run(cfg: DictConfig) -> dict:
    """Validate `cfg` and run the evolution; returns the run summary."""
    settings = validate(cfg)
    plain = OmegaConf.to_container(settings, resolve=True)
    early_checks(plain)
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
    except (ValueError, FileNotFoundError) as exc:  # bad input found before or during the run
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(
            f"error: no room to write ({exc}); nothing partial was kept: free space and run the "
            "same command again to continue",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"\n{summary['table']}\n")
    print(
        f"stopped: {summary['stop_reason']}; best {summary['best_model']} "
        f"avg={summary['best_avg']:.4f} (best foundation {summary['best_foundation_avg']:.4f}); "
        f"outputs in {summary['outputs']['table'].rsplit('/', 1)[0]}"
    )


if __name__ == "__main__":
    main()
