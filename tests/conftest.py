from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests import netns

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("FEDPACS_DATA_DIR")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    if not d.is_dir():
        raise RuntimeError(f"shared data not found at {d}; set FEDPACS_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hermetic tests: no fedpacs settings leak in from the caller's environment."""
    for key in list(os.environ):
        if key.startswith("FEDPACS_") and key != "FEDPACS_DATA_DIR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's task identity, as a ClientApp/ServerApp process has it, for code run in
    this process (the in-memory grid; `pytestmark = usefixtures("task_identity")`)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# -- network namespaces (tests/netns.py): test hosts for end-to-end tests ----------------


@pytest.fixture()
def netns_ok() -> None:
    """Skip the test when network namespaces cannot be created here, with the reason;
    under CI=true fail it instead (a CI machine must be able to run these tests)."""
    netns.require_netns(netns.netns_available(), ci=os.environ.get("CI"))


@pytest.fixture()
def network_factory(netns_ok: None) -> Iterator[Callable[..., netns.Network]]:
    """``network_factory(hospitals=2, **kw)`` -> an entered :class:`tests.netns.Network`,
    deleted (with every process in it) when the test ends."""
    with ExitStack() as stack:

        def make(hospitals: int = 2, **kw: Any) -> netns.Network:
            return stack.enter_context(netns.Network(hospitals, **kw))

        yield make
