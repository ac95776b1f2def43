"""The shell commands the README and docs/ show, as written, for the tests that run them.

A fenced block is tested when the line before it (blank lines aside) is a marker:
`<!-- test: run -->` (tests/test_readme.py runs each command as pasted), `<!-- test: validate -->`
(it composes and validates each `flows.evolve` / `flows.study` command's config, which would
otherwise take a whole run to reach) or `<!-- test: dvc -->` (tests/test_dvc.py runs them).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
KINDS = ("run", "validate", "dvc")
MARKER = re.compile(r"^<!-- test: (?P<kind>[\w-]+) -->\s*$")

# the documented DVC commands tests/test_dvc.py runs as pasted (docs/operations.md)
REPRO = ".venv/bin/dvc repro"
EXP_RUN_GREEDY = ".venv/bin/dvc exp run -S '+experiment=greedy'"
EXP_SHOW = ".venv/bin/dvc exp show"
METRICS_SHOW = ".venv/bin/dvc metrics show"
PUSH = ".venv/bin/dvc push"
PULL = ".venv/bin/dvc pull"
RESUME = ".venv/bin/python -m flows.evolve +experiment=greedy_kinship"
DOCUMENTED_DVC = (REPRO, EXP_RUN_GREEDY, EXP_SHOW, METRICS_SHOW, PUSH, PULL, RESUME)


@dataclass(frozen=True)
class Command:
    text: str  # as a user pastes it (continuation lines joined by bash's own rule)
    kind: str
    where: str  # file:line of the command, for messages and test ids


def _commands(lines: list[str], start: int, kind: str, name: str) -> list[Command]:
    out: list[Command] = []
    pending, first = "", 0
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append(Command(pending + line, kind, f"{name}:{first}"))
        pending = ""
    return out


def marked_commands(files: tuple[Path, ...] = DOCS) -> list[Command]:
    """Every command of every marked block; a marker of an unknown kind, one that is not
    followed by a fenced block, or a marked block with no command is an error."""
    found: list[Command] = []
    for path in files:
        lines = path.read_text().splitlines()
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        i = 0
        while i < len(lines):
            match = MARKER.match(lines[i])
            i += 1
            if not match:
                continue
            kind, at = match["kind"], f"{name}:{i}"
            if kind not in KINDS:
                raise ValueError(f"{at}: unknown marker kind {kind!r} (one of {', '.join(KINDS)})")
            while i < len(lines) and not lines[i].strip():
                i += 1
            if i == len(lines) or not lines[i].startswith("```"):
                raise ValueError(f"{at}: the marker is not followed by a fenced block")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{at}: the fenced block is not closed")
            block = _commands(lines[i + 1 : end], i + 2, kind, name)
            if not block:
                raise ValueError(f"{at}: the marked block has no command")
            found.extend(block)
            i = end + 1
    return found


def documented(kind: str, prefix: str) -> str:
    """The one marked command of `kind` that starts with `prefix`, as written in the docs; a
    test that needs it fails here when the docs no longer show it."""
    hits = [c.text for c in marked_commands() if c.kind == kind and c.text.startswith(prefix)]
    assert len(hits) == 1, (
        f"expected one `{prefix}...` in a <!-- test: {kind} --> block of README.md or docs/, "
        f"found {len(hits)}"
    )
    return hits[0]


def user_shell_env(**extra: str) -> dict[str, str]:
    """A user's environment with the venv not activated: no venv folder on PATH, no VIRTUAL_ENV,
    so a command that leans on an activated venv fails here as it would for them."""
    venvs = {Path(sys.executable).parent.resolve(), (ROOT / ".venv" / "bin").resolve()}
    entries = os.environ.get("PATH", "").split(os.pathsep)
    path = [p for p in entries if p and Path(p).resolve() not in venvs]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": os.pathsep.join(path), **extra}
