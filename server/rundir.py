"""A run directory on the server: per-round checkpoints, metrics and the final model.

Layout::

    RUN_DIR/
      status.json               state, current round, total rounds (updated every round)
      metrics.json              every round so far: aggregated + per-site + held-out metrics,
                                timing; a round's "evaluate" (the sites' evaluation of its
                                model) is added when the next round's replies bring it
      rounds/round-NNN/model.pt global weights after round NNN (000 = initial)
      rounds/round-NNN/metrics.json
      final/model.pt            the global model; load with fedpacs.load_model(path)
      final/model_card.json     task, network, config, sites, metrics, hashes
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from fedpacs.common.artifacts import save_model, write_json
from fedpacs.common.tasks import TaskConfig
from fedpacs.server.recorder import Phase, RoundRecord


@dataclass
class RunDirectory:
    root: Path
    task: TaskConfig
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def set_status(self, state: str, *, round_: int, total: int, error: str = "") -> None:
        write_json(self.root / "status.json", {
            "state": state, "round": round_, "rounds": total, "error": error,
            "updated": time.time(), "started": self.started})

    def save_round(self, model: nn.Module, record: RoundRecord) -> str:
        """Checkpoint the global model after ``record.round`` and append the record."""
        digest = self.save_checkpoint(model, record)
        self.append_round(record)
        return digest

    def _folder(self, server_round: int) -> Path:
        return self.root / "rounds" / f"round-{server_round:03d}"

    def save_checkpoint(self, model: nn.Module, record: RoundRecord) -> str:
        """Write the global model after ``record.round`` (its card holds the record as
        known then) and set ``record.model_sha256``."""
        card = {"round": record.round, "metrics": record.to_json(), "config": self.config}
        record.model_sha256 = save_model(self._folder(record.round) / "model.pt", model=model,
                                         task=self.task, card=card)
        return record.model_sha256

    def append_round(self, record: RoundRecord) -> None:
        """Write the round's record (its metrics.json and the run's)."""
        write_json(self._folder(record.round) / "metrics.json", record.to_json())
        self.rounds.append(record.to_json())
        self._write_metrics()

    def amend_round(self, server_round: int, *, evaluate: Phase) -> None:
        """Add the sites' evaluation of round ``server_round``'s global model to its record:
        it comes with the next round's train replies (the last round's from the final
        evaluate exchange), after the round itself was written."""
        index = next((i for i, r in enumerate(self.rounds) if r["round"] == server_round), None)
        if index is None:
            raise LookupError(f"round {server_round} has no record in {self.root} to amend")
        record = replace(RoundRecord.from_json(self.rounds[index]), evaluate=evaluate)
        self.rounds[index] = record.to_json()
        write_json(self._folder(server_round) / "metrics.json", self.rounds[index])
        self._write_metrics()

    def _write_metrics(self) -> None:
        write_json(self.root / "metrics.json", {"task": self.task.to_dict(), "rounds": self.rounds})

    def save_final(self, model: nn.Module, card: dict[str, Any]) -> Path:
        path = self.root / "final" / "model.pt"
        full = {**card, "task": self.task.to_dict(), "config": self.config, "rounds": self.rounds,
                "created": time.time()}
        digest = save_model(path, model=model, task=self.task, card=full)
        write_json(self.root / "final" / "model_card.json",
                   {**full, "files": {"model.pt": {"sha256": digest}}})
        return path


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The round records written so far ([] before the first, or while it is written)."""
    try:
        return list(json.loads((run_dir / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return []


def read_status(run_dir: Path) -> dict[str, Any]:
    """``status.json`` of a run ({} before the ServerApp wrote it)."""
    try:
        return dict(json.loads((run_dir / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


# A run's server-side settings (run dir, held-out data, artifact key, metrics port) never
# travel in its app (every site receives the app): `run start` writes them beside the run,
# and the ServerApp finds them under the runs folder its SuperLink was started with.
RUNS_DIR_ENV = "FEDPACS_RUNS_DIR"
SERVER_SIDE_FILE = "server.json"
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def write_server_side(run_dir: Path, fields: dict[str, Any]) -> Path:
    path = run_dir / SERVER_SIDE_FILE
    write_json(path, fields)
    return path


def read_server_side(run_name: str) -> dict[str, Any]:
    """The server-side fields of run ``run_name`` ({} when this ServerApp was not started
    by a fedpacs coordinator, or the run has no such name)."""
    runs = os.environ.get(RUNS_DIR_ENV, "")
    if not runs or not RUN_NAME_RE.match(run_name):
        return {}
    try:
        return dict(json.loads((Path(runs) / run_name / SERVER_SIDE_FILE).read_text()))
    except (OSError, ValueError):
        return {}
