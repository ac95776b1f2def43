"""Regenerate params.yaml from conf/ the way DVC's Hydra integration does: `python -m flows.params`.

`dvc exp run` rewrites params.yaml itself; `dvc repro` uses the committed one, so run this after
changing conf/ (a test fails while they disagree).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose_params(out: Path, overrides: list[str]) -> Path:
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(ROOT / "conf"), None, "config", "", overrides)
    return out


if __name__ == "__main__":
    print(f"wrote {compose_params(ROOT / 'params.yaml', sys.argv[1:])}")
