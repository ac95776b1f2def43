"""Shared fixtures: offline environment, the micro zoo (built once per session)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


SHARED_RUN_GROUP = "shared_run"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`scripts/test.sh` runs two workers), the tests that read or add to the
    shared run's folder (`evolve_root`) run on one worker, one after another, as they would
    without xdist: session fixtures are per worker, and the shared run is built once."""
    for item in items:
        if "evolve_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(SHARED_RUN_GROUP))


def without_prefect_server() -> dict[str, str]:
    """The environment for a run that starts its own temporary Prefect server, as a user's
    plain run does (the shared test server below is left out)."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(url: str) -> bool:
    """Whether the server at `url` (Prefect's API, MLflow) answers 200 on /health."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def wait_healthy(url: str, server: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait until `server` answers on `url`/health; it exiting or `timeout` s passing fails."""
    deadline = time.monotonic() + timeout
    while not is_healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: no answer on {url}/health")
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def prefect_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str | None]:
    """One `prefect server start` (127.0.0.1) for every flow the slow tests run.

    Each run would otherwise start and stop a temporary server of its own, about 10 s apiece on
    this 2-core machine. The runs are the same flows either way (a dedicated server is the
    README's multi-run setup); test_crash keeps the temporary server, the default path.
    """
    if os.environ.get("PREFECT_API_URL") or not any(
        item.get_closest_marker("slow") for item in request.session.items
    ):
        yield None
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path_factory.mktemp("prefect-server")
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # the UI's pages call this API (tests/test_prefect_ui.py reads them)
        env={**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(api, server, 180, f"prefect server (log: {home / 'server.log'})")
    except RuntimeError:
        server.kill()
        raise
    os.environ["PREFECT_API_URL"] = api
    try:
        yield api
    finally:
        del os.environ["PREFECT_API_URL"]
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def compose_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro zoo, built with the project's own builder and config."""
    from omegaconf import OmegaConf

    from tasks.zoo.build import build_zoo

    zoo_dir = tmp_path_factory.mktemp("zoo") / "zoo"
    cfg = compose_config("+debug=micro")
    build_zoo(zoo_dir, OmegaConf.to_container(cfg.zoo, resolve=True), progress=False)
    return zoo_dir


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local stand-in tasks of the leaderboard's shapes (tests/stand_ins.py)."""
    from tests.stand_ins import write_stand_ins

    return write_stand_ins(tmp_path_factory.mktemp("stand_ins"))


def evolve_command(root: Path, zoo: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.evolve",
        "+debug=micro",
        f"paths.root={root}",
        f"paths.zoo_dir={zoo}",
        *overrides,
        # e.g. `runtime=dask device=cuda tracking.enabled=false` for a GPU machine's check
        *shlex.split(os.environ.get("KINSHIP_TEST_OVERRIDES", "")),
    ]


def run_evolve(
    root: Path,
    zoo: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    own_server: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m flows.evolve` on the micro zoo, everything written under `root`;
    `own_server`: with a temporary Prefect server of its own, not the shared one."""
    base = without_prefect_server() if own_server else dict(os.environ)
    return subprocess.run(
        evolve_command(root, zoo, *overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**base, **(env or {})},
    )


@pytest.fixture(scope="session")
def evolve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evolve")


FINAL_TOP_K = 3


@pytest.fixture(scope="session")
def kinship_overrides(stand_ins: Path) -> list[str]:
    """greedy_kinship searching on the zoo's tasks, with a different final benchmark for its
    top 3: the stand-in generation (exact_match, strict-match) and multiple-choice tasks."""
    return [
        "+experiment=greedy_kinship",
        "final_eval=zoo",
        f"final_eval.top_k={FINAL_TOP_K}",
        f"final_eval.include_path={stand_ins}",
        "final_eval.tasks=[{task:sg_gen,metric:'exact_match,strict-match'},"
        "{task:sg_mc,metric:acc_norm}]",
    ]


@pytest.fixture(scope="session")
def kinship_run(
    evolve_root: Path, micro_zoo: Path, kinship_overrides: list[str]
) -> subprocess.CompletedProcess[str]:
    """One real greedy_kinship run on the micro zoo, shared by the tests that read its outputs."""
    return run_evolve(evolve_root, micro_zoo, *kinship_overrides)


def spy_simple_evaluate(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """lm-eval's own result of the next `simple_evaluate` call, under `["out"]`."""
    import lm_eval

    seen: dict[str, Any] = {}
    real = lm_eval.simple_evaluate

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    return seen
