"""The commands README.md and docs/ show still work as written (tests/documented.py says which).

`run` blocks are pasted into `bash -c` from the repo root, in a shell without the venv activated;
`validate` blocks (whole runs, minutes each) have their config composed from conf/ with the
command's own overrides and validated as `flows.evolve` would, before any work. The DVC blocks
run in tests/test_dvc.py (slow); here only that each command it needs is still documented.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.documented import (
    DOCUMENTED_DVC,
    ROOT,
    Command,
    documented,
    marked_commands,
    user_shell_env,
)

COMMANDS = marked_commands()
PYTHON = ".venv/bin/python"
ENTRY_POINTS = ("flows.evolve", "flows.study")


def _params(kind: str) -> list:
    marks = []
    for c in COMMANDS:
        if c.kind != kind:
            continue
        merge = [t.split("=", 1)[1] for t in c.text.split() if t.startswith("merge=")]
        # `merge=NAME` for a method without a preset lands with issue 17 item 4 (another branch);
        # strict, so this marker fails, and goes, once it does
        without_preset = [m for m in merge if not (ROOT / "conf" / "merge" / f"{m}.yaml").exists()]
        marks.append(
            pytest.param(
                c,
                id=c.where,
                marks=[pytest.mark.xfail(strict=True, reason="merge=NAME without a preset")]
                if without_preset
                else [],
            )
        )
    return marks


def test_markers_name_blocks_of_each_kind() -> None:
    kinds = {c.kind for c in COMMANDS}
    assert kinds == {"run", "validate", "dvc"}, kinds


def test_a_bad_marker_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- test: rnu -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="unknown marker kind 'rnu'"):
        marked_commands((page,))
    page.write_text("<!-- test: run -->\ntext\n")
    with pytest.raises(ValueError, match="not followed by a fenced block"):
        marked_commands((page,))
    page.write_text("<!-- test: run -->\n```bash\n# only a comment\n```\n")
    with pytest.raises(ValueError, match="has no command"):
        marked_commands((page,))


@pytest.mark.parametrize("prefix", DOCUMENTED_DVC)
def test_the_dvc_tests_commands_are_documented(prefix: str) -> None:
    documented("dvc", prefix)


def test_a_missing_command_fails() -> None:
    with pytest.raises(AssertionError, match="found 0"):
        documented("run", ".venv/bin/python -m flows.nothing")


@pytest.mark.parametrize("command", _params("run"))
def test_run_block_works_as_pasted(command: Command) -> None:
    assert (ROOT / PYTHON).exists(), "the docs' commands use .venv: run `bash scripts/setup.sh`"
    done = subprocess.run(
        ["bash", "-c", command.text],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=user_shell_env(),
    )
    assert done.returncode == 0, f"{command.where}: {command.text}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{command.where}: printed nothing"
    if "--cfg job" in command.text:
        from omegaconf import OmegaConf

        from flows.run.schema import validate

        validate(OmegaConf.create(done.stdout))


def _overrides(command: Command) -> tuple[str, list[str]]:
    words = shlex.split(command.text, comments=True)
    while words and "=" in words[0] and not words[0].startswith(("-", ".")):
        words.pop(0)  # VAR=value before the command
    assert words[:2] == [PYTHON, "-m"] and words[2] in ENTRY_POINTS, (
        f"{command.where}: a validate block holds `{PYTHON} -m flows.evolve|flows.study ...` "
        f"commands only, got: {command.text}"
    )
    return words[2], [w for w in words[3:] if w not in ("-m", "--multirun")]


def _jobs(overrides: list[str]) -> list[list[str]]:
    """One override list per job of a `-m` sweep (Hydra's own parser expands `a=x,y`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for text, parsed in zip(
        overrides, OverridesParser.create().parse_overrides(overrides), strict=True
    ):
        if not parsed.is_sweep_override():
            axes.append([text])
            continue
        key = text.split("=", 1)[0]
        axes.append([f"{key}={value}" for value in parsed.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("command", _params("validate"))
def test_validate_block_composes_and_validates(command: Command) -> None:
    from omegaconf import open_dict

    from flows.run.schema import validate

    entry, overrides = _overrides(command)
    for job in _jobs(overrides):
        cfg = compose_config(*job)
        if entry == "flows.study":
            assert "study" in cfg, f"{command.where}: no study chosen"
            with open_dict(cfg):  # the study's runs are evolve configs plus its seeds and grid
                del cfg["study"]
        validate(cfg)
