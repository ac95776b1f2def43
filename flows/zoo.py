"""Build the embedded model zoo: `python -m flows.zoo` (also the DVC `zoo` stage).

Prints the zoo's quality bar (scores of base and foundations, generation-1 merge gains) and the
wall time. Idempotent: an up-to-date zoo is left as it is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# the zoo is built and evaluated from local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from flows.run.console import quiet_logs
    from tasks.zoo.build import build_zoo, format_quality

    quiet_logs()  # the quality check's merges and evaluations: libraries' INFO to the log file
    zoo_dir = Path(cfg.paths.zoo_dir).resolve()
    started = time.time()
    manifest = build_zoo(zoo_dir, OmegaConf.to_container(cfg.zoo, resolve=True))
    models = ", ".join(manifest["foundations"])
    print(f"zoo at {zoo_dir}: base + {models}; tasks {', '.join(manifest['tasks'])}")
    print(f"{manifest['n_params']:,} parameters per model; built in {manifest['build_seconds']} s")
    if manifest.get("quality"):
        print(format_quality(manifest["quality"]))
    print(f"done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
