"""A run directory on the server: per-round checkpoints, metrics and the final model.

Layout::

    RUN_DIR/
      status.json               state, current round, total rounds (updated every round)
      metrics.json              every round so far: aggregated + per-site + held-out metrics,
                                timing; a round's "evaluate" (the sites' evaluation of its
                                model) is added when the next round's replies bring it
      run-config.json           the run's full config as it was started (for resuming)
      rounds/round-NNN/model.pt global weights after round NNN (000 = initial)
      rounds/round-NNN/strategy.pt  the global model as the strategy holds it (packed) and
                                the strategy's own state (FedAdam's moments), for resuming
      rounds/round-NNN/metrics.json
      final/model.pt            the global model; load with fedpacs.load_model(path)
      final/model_card.json     task, network, config, sites, metrics, hashes

A round's record in metrics.json holds the SHA-256 of its model.pt and strategy.pt, and
is written after both: a round with a record has its checkpoint (fedpacs.server.resume
checks it before a run continues from it). Every file is written crash-safe
(fedpacs.common.artifacts.atomic_write).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedpacs.common import wire
from fedpacs.common.artifacts import save_model, save_tensors, write_json
from fedpacs.common.tasks import TaskConfig
from fedpacs.server.recorder import Phase, RoundRecord

MODEL_FILE = "model.pt"
STRATEGY_FILE = "strategy.pt"
STRATEGY_FORMAT = "fedpacs-strategy/1"
RUN_CONFIG_FILE = "run-config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"


def round_folder(root: Path, server_round: int) -> Path:
    return root / "rounds" / f"round-{server_round:03d}"


@dataclass
class RunDirectory:
    root: Path
    task: TaskConfig
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def set_status(self, state: str, *, round_: int, total: int, error: str = "",
                   detail: str = "") -> None:
        """``state``: running, finished, failed (``error``: the exception's type; ``detail``:
        its message, for fedpacs' own coded errors) or interrupted (``error``: the signal
        or exit that stopped the ServerApp)."""
        write_json(self.root / STATUS_FILE, {
            "state": state, "round": round_, "rounds": total, "error": error,
            "updated": time.time(), "started": self.started} | (
            {"detail": detail} if detail else {}))

    def write_run_config(self, flat: dict[str, Any]) -> None:
        """The run's full config as it was started (read back by a resume)."""
        write_json(self.root / RUN_CONFIG_FILE, flat)

    def reopen(self, rounds: list[dict[str, Any]]) -> None:
        """Continue this run after its last completed round: ``rounds`` are its records
        through that round (checked by fedpacs.server.resume). metrics.json is written
        back with them alone; the folders of later rounds (a round checkpointed but never
        recorded before the stop) and stray temp files go; the run keeps its start time."""
        self.rounds = [dict(r) for r in rounds]
        last = int(self.rounds[-1]["round"]) if self.rounds else -1
        for folder in sorted((self.root / "rounds").glob("round-*")):
            number = folder.name.removeprefix("round-")
            if number.isdigit() and int(number) > last:
                shutil.rmtree(folder)
        for name in (METRICS_FILE, STATUS_FILE, MODEL_FILE, STRATEGY_FILE):
            for stray in [*self.root.glob(f".{name}.*.tmp"),
                          *(self.root / "rounds").glob(f"*/.{name}.*.tmp")]:
                stray.unlink(missing_ok=True)
        started = read_status(self.root).get("started")
        if isinstance(started, int | float) and not isinstance(started, bool):
            self.started = float(started)
        self._write_metrics()

    def save_round(self, model: nn.Module, record: RoundRecord) -> str:
        """Checkpoint the global model after ``record.round`` and append the record."""
        digest = self.save_checkpoint(model, record)
        self.append_round(record)
        return digest

    def _folder(self, server_round: int) -> Path:
        return round_folder(self.root, server_round)

    def save_checkpoint(self, model: nn.Module, record: RoundRecord, *,
                        global_arrays: ArrayRecord | None = None,
                        strategy: dict[str, torch.Tensor] | None = None) -> str:
        """Write the global model after ``record.round`` (its card holds the record as
        known then) and the strategy's checkpoint: ``global_arrays`` (the global model
        as the strategy holds it, packed; default: ``model``'s state) and its own state
        ``strategy``; sets ``record.model_sha256`` and ``record.strategy_sha256``.
        strategy.pt holds the packed global model only where it is not model.pt's state
        packed (FedAdam's float64 arithmetic, averaged integer buffers): None else."""
        card = {"round": record.round, "metrics": record.to_json(), "config": self.config}
        folder = self._folder(record.round)
        record.model_sha256 = save_model(folder / MODEL_FILE, model=model, task=self.task,
                                         card=card)
        own = wire.pack(model.state_dict())
        packed = global_arrays[wire.PACKED_KEY].numpy() \
            if global_arrays is not None and wire.is_packed(global_arrays) else own
        same = packed.dtype == own.dtype and np.array_equal(packed, own)
        record.strategy_sha256 = save_tensors(folder / STRATEGY_FILE, {
            "format": STRATEGY_FORMAT, "round": record.round,
            "strategy": str(self.config.get("strategy", "")),
            "global": None if same else torch.from_numpy(np.array(packed, copy=True)),
            "state": {k: v.detach().cpu() for k, v in (strategy or {}).items()}})
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
        write_json(self.root / METRICS_FILE, {"task": self.task.to_dict(),
                                              "rounds": self.rounds})

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


def read_server_side_file(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s server.json ({} when it has none or it is unreadable)."""
    try:
        return dict(json.loads((run_dir / SERVER_SIDE_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def read_server_side(run_name: str) -> dict[str, Any]:
    """The server-side fields of run ``run_name`` ({} when this ServerApp was not started
    by a fedpacs coordinator, or the run has no such name)."""
    runs = os.environ.get(RUNS_DIR_ENV, "")
    if not runs or not RUN_NAME_RE.match(run_name):
        return {}
    return read_server_side_file(Path(runs) / run_name)
