"""Resuming a stopped run from its last completed round (``fedpacs run resume RUN_DIR``).

A round is completed when its record is in the run's ``metrics.json``: the ServerApp
writes it after the round's checkpoint (``rounds/round-NNN/model.pt`` and
``strategy.pt``, whose SHA-256s the record holds). :func:`load_resume` finds the last
such round and checks every recorded round's files against their record, the last one's
against the run's own config too; :func:`mark_resume` writes into the run's
``server.json`` that the next ServerApp started for the run continues after that round;
that ServerApp reads the checkpoint back with :func:`open_checkpoint` (checked again).

What is refused, each with a coded error naming the file, what was expected, what was
found and the fix:

* a run dir without a checkpoint, or a finished run (nothing to resume): ConfigError;
* a recorded round whose checkpoint is missing, unreadable or not the file its record
  hashed (a kill during its write, or tampering): DataError. A round is never dropped
  once recorded; only a round checkpointed but not yet recorded when the run stopped is
  (it is run again);
* a checkpoint written by another run (its card's config or task is not this run's,
  e.g. a model.pt copied over), or a ServerApp resuming with another config: ConfigError.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedpacs.common import wire
from fedpacs.common.artifacts import read_model_file
from fedpacs.common.config import RESUME_FIELD, RunConfig
from fedpacs.common.errors import ConfigError, DataError, FieldError
from fedpacs.common.hashing import sha256_file
from fedpacs.server.rundir import (
    METRICS_FILE,
    MODEL_FILE,
    RUN_CONFIG_FILE,
    STATUS_FILE,
    STRATEGY_FILE,
    STRATEGY_FORMAT,
    read_status,
    round_folder,
    write_server_side,
)

log = logging.getLogger("fedpacs.server")

RESUME_KEY = RESUME_FIELD.replace("_", "-")  # its name in a flat run config and a card
START_AGAIN = "start the run again with `fedpacs run start` (same run.toml)"


@dataclass(frozen=True)
class Resume:
    """Where a stopped run continues: after ``round`` (its last completed round, whose
    checkpoint verified), with the run's full config as it was started (``run_dir`` and
    ``run_name`` as the run has them; ``resume_from`` -1) and the SHA-256 of that
    round's model.pt."""

    round: int
    config: RunConfig
    model_sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's checkpoint, verified, as a resumed ServerApp continues from
    it: the global model's state (model.pt), the global model as the strategy holds it
    (packed, exactly as aggregated), the strategy's own state and the run's records
    through this round (the metrics.json entries)."""

    round: int
    state_dict: dict[str, torch.Tensor]
    global_arrays: ArrayRecord
    strategy_state: dict[str, torch.Tensor]
    records: list[dict[str, Any]]


def load_resume(run_dir: Path) -> Resume:
    """The last completed round of the run in ``run_dir`` and the run's config; a
    ConfigError (nothing to resume, foreign checkpoint) or DataError (corrupt
    checkpoint) naming the file, what was expected, what was found and the fix."""
    cfg, checkpoint, digest = _verified(run_dir)
    return Resume(round=checkpoint.round, config=cfg, model_sha256=digest)


def mark_resume(run_dir: Path, resume: Resume) -> None:
    """Write in ``run_dir``'s server.json (the run's server-side settings, read by its
    ServerApp) that the next ServerApp started for this run continues after
    ``resume.round``."""
    cfg = replace(resume.config, resume_from=resume.round)
    errs = [e for e in cfg.validate() if e.field == RESUME_KEY]
    if errs:
        raise ConfigError(str(run_dir / "server.json"), errs)
    write_server_side(run_dir, cfg.server_side())


def open_checkpoint(cfg: RunConfig) -> Checkpoint:
    """The checkpoint a resumed ServerApp continues from (``cfg.resume_from`` of the run
    in ``cfg.run_dir``), verified as by :func:`load_resume`; ConfigError when ``cfg`` is
    not the config the run started with, or the run's last completed round is not
    ``cfg.resume_from`` (a stale resume: resume it again)."""
    run_dir = Path(cfg.run_dir)
    started, checkpoint, _ = _verified(run_dir)
    differing = _differences(replace(started, resume_from=-1).to_flat(),
                             replace(cfg, resume_from=-1).to_flat(),
                             fix="resume with the config the run was started with (`fedpacs "
                             "run resume` builds it from run-config.json)")
    if differing:
        raise ConfigError(f"{run_dir / RUN_CONFIG_FILE} (the resumed run's config)", differing)
    if checkpoint.round != cfg.resume_from:
        raise ConfigError(str(run_dir / "server.json"), [FieldError(
            RESUME_KEY, f"the run's last completed round ({checkpoint.round}, in "
            f"{run_dir / METRICS_FILE})", str(cfg.resume_from),
            "run `fedpacs run resume` again: it finds the last completed round")])
    log.info("resuming %s after round %d of %d", run_dir, checkpoint.round, cfg.rounds)
    return checkpoint


# --------------------------------------------------------------------------- checks
def _verified(run_dir: Path) -> tuple[RunConfig, Checkpoint, str]:
    """(the run's config as started, its last completed round's checkpoint, that
    round's model SHA-256), every recorded round checked."""
    _refuse_finished(run_dir)
    cfg = _run_config(run_dir)
    records = _records(run_dir, cfg)
    for record in records[:-1]:  # every recorded round keeps the files it recorded
        k = int(record["round"])
        _check_hash(round_folder(run_dir, k) / MODEL_FILE, record, "model_sha256", k)
        _check_hash(round_folder(run_dir, k) / STRATEGY_FILE, record, "strategy_sha256", k)
    last = records[-1]
    k = int(last["round"])
    model_path = round_folder(run_dir, k) / MODEL_FILE
    state = _read_model(model_path, cfg, k)
    digest = _check_hash(model_path, last, "model_sha256", k)
    strategy_path = round_folder(run_dir, k) / STRATEGY_FILE
    global_arrays, strategy_state = _read_strategy(strategy_path, cfg, k, state)
    _check_hash(strategy_path, last, "strategy_sha256", k)
    return cfg, Checkpoint(round=k, state_dict=state, global_arrays=global_arrays,
                           strategy_state=strategy_state, records=records), digest


def _refuse_finished(run_dir: Path) -> None:
    final = run_dir / "final" / MODEL_FILE
    state = read_status(run_dir).get("state")
    if state == "finished" or final.exists():
        where = run_dir / STATUS_FILE if state == "finished" else final
        raise ConfigError(str(where), [FieldError(
            "state", "a stopped run (running, failed or interrupted) to resume",
            f"a finished run (its final model is {final})",
            "nothing to resume: use the final model, or start a new run with `fedpacs run "
            "start`")])


def _no_checkpoint(run_dir: Path, path: Path, found: str) -> ConfigError:
    return ConfigError(str(path), [FieldError(
        "checkpoint", f"a run folder with run-config.json and at least round 0's checkpoint "
        f"recorded (written as the run starts) in {run_dir}", found,
        f"check the path; a run stopped before its first checkpoint has nothing to resume: "
        f"{START_AGAIN}")])


def _run_config(run_dir: Path) -> RunConfig:
    """The run's config as it was started (run-config.json)."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        found = "no such folder" if not run_dir.is_dir() else f"no {RUN_CONFIG_FILE}"
        raise _no_checkpoint(run_dir, path, found)
    try:
        flat = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"expected the run's config as JSON, found unreadable "
                        f"content ({type(exc).__name__})", START_AGAIN,
                        kind="corrupt-run-config") from exc
    if not isinstance(flat, dict):
        raise DataError(str(path), f"expected a JSON object, found {type(flat).__name__}",
                        START_AGAIN, kind="corrupt-run-config")
    cfg = RunConfig.from_flat(flat, source=str(path))
    where = Path(cfg.run_dir).resolve() if cfg.run_dir else None
    if where != run_dir.resolve():
        raise ConfigError(str(path), [FieldError(
            "run-dir", f"this folder ({run_dir.resolve()})", repr(cfg.run_dir),
            "resume the run in the folder it was started in (move it back), or start a new "
            "run")])
    return cfg


def _records(run_dir: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """The run's round records (0, 1, ... in order; at least one), read strictly."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise _no_checkpoint(run_dir, path, f"no {METRICS_FILE}: no round was completed")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"expected the run's round records as JSON, found "
                        f"unreadable content ({type(exc).__name__})",
                        f"restore {path} from a backup, or {START_AGAIN}",
                        kind="corrupt-metrics") from exc
    rounds = doc.get("rounds") if isinstance(doc, dict) else None
    numbers = [r.get("round") for r in rounds if isinstance(r, dict)] \
        if isinstance(rounds, list) else None
    if numbers is None or numbers != list(range(len(numbers))) \
            or len(numbers) != len(rounds or []):
        raise DataError(str(path), f"expected records of rounds 0, 1, 2, ... in order, found "
                        f"{numbers if numbers is not None else type(rounds).__name__}",
                        f"restore {path} from a backup, or {START_AGAIN}",
                        kind="corrupt-metrics")
    if not numbers:
        raise _no_checkpoint(run_dir, path, f"{METRICS_FILE} without any round")
    if doc.get("task") != cfg.task_config().to_dict():
        raise ConfigError(str(path), [FieldError(
            "task", f"this run's task {cfg.task!r} ({RUN_CONFIG_FILE})",
            repr(doc.get("task", {}).get("name") if isinstance(doc.get("task"), dict)
                 else doc.get("task")),
            f"{METRICS_FILE} belongs to another run: put back this run's own file, or "
            f"{START_AGAIN}")])
    return [dict(r) for r in rounds]  # type: ignore[union-attr]


def _corrupt(path: Path, k: int, found: str) -> DataError:
    return DataError(str(path), f"expected the checkpoint recorded for round {k} in "
                     f"{METRICS_FILE}, found {found} (a kill during its write, a damaged "
                     "disk, or tampering)", f"restore the file from a backup, or {START_AGAIN}"
                     f"; the run is not resumed past a recorded round it cannot verify",
                     kind="corrupt-checkpoint")


def _check_hash(path: Path, record: dict[str, Any], key: str, k: int) -> str:
    expected = str(record.get(key, ""))
    if not expected:
        raise DataError(str(path), f"expected {key} in round {k}'s record in {METRICS_FILE}, "
                        "found none (a run checkpointed by a fedpacs without resume)",
                        START_AGAIN, kind="no-checkpoint-hash")
    if not path.is_file():
        raise _corrupt(path, k, "no such file")
    digest = sha256_file(path)
    if digest != expected:
        raise _corrupt(path, k, f"a file of SHA-256 {digest[:16]}... where the record has "
                       f"{expected[:16]}...")
    return digest


def _differences(expected: dict[str, Any], found: dict[str, Any], *, fix: str
                 ) -> list[FieldError]:
    return [FieldError(f"config.{key}", repr(expected.get(key)), repr(found.get(key)), fix)
            for key in sorted(set(expected) | set(found))
            if key != RESUME_KEY and expected.get(key) != found.get(key)]


def _read_model(path: Path, cfg: RunConfig, k: int) -> dict[str, torch.Tensor]:
    """Round ``k``'s model.pt, read and checked to be this run's: its state dict."""
    if not path.is_file():
        raise _corrupt(path, k, "no such file")
    try:
        payload = read_model_file(path)
        card = json.loads(payload["card"])
    except (DataError, ValueError) as exc:
        raise _corrupt(path, k, f"a file that is not a readable model ({exc})") from exc
    foreign = "this checkpoint was written by another run (e.g. copied over): put back " \
        f"this run's own file, or {START_AGAIN}"
    errs = _differences(cfg.to_flat(), card.get("config") or {}, fix=foreign) \
        if isinstance(card, dict) else [FieldError("card", "a JSON object", "other", foreign)]
    if payload["task"] != cfg.task_config().to_dict():
        errs.append(FieldError("task", repr(cfg.task_config().to_dict()),
                               repr(payload["task"]), foreign))
    if isinstance(card, dict) and card.get("round") != k:
        errs.append(FieldError("round", str(k), repr(card.get("round")), foreign))
    if errs:
        raise ConfigError(f"{path} (its model card)", errs)
    state = payload["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _corrupt(path, k, "a state dict holding other things than tensors")
    return dict(state)


def _read_strategy(path: Path, cfg: RunConfig, k: int, state: dict[str, torch.Tensor]
                   ) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """Round ``k``'s strategy.pt: (the packed global model, the strategy's state)."""
    if not path.is_file():
        raise _corrupt(path, k, "no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise _corrupt(path, k, f"an unreadable file ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != STRATEGY_FORMAT:
        raise _corrupt(path, k, f"a file whose format is not {STRATEGY_FORMAT}")
    if payload.get("strategy") != cfg.strategy or payload.get("round") != k:
        raise ConfigError(str(path), [FieldError(
            "strategy/round", f"{cfg.strategy!r} after round {k}",
            f"{payload.get('strategy')!r} after round {payload.get('round')!r}",
            f"this strategy checkpoint was written by another run: put back this run's own "
            f"file, or {START_AGAIN}")])
    packed, own = payload.get("global"), payload.get("state")
    size = sum(int(v.numel()) for v in state.values())
    # None: model.pt's state packed; else float32 as packed, or float64 as FedAdam's
    # arithmetic leaves it (kept exactly)
    if packed is None:
        packed = torch.from_numpy(wire.pack(state))
    if not isinstance(packed, torch.Tensor) or tuple(packed.shape) != (size,) \
            or not packed.is_floating_point() or not isinstance(own, dict) \
            or not all(isinstance(v, torch.Tensor) for v in own.values()):
        raise _corrupt(path, k, f"no packed global model of {size} floating values beside "
                       "a state of tensors")
    arrays = ArrayRecord({wire.PACKED_KEY: Array(np.ascontiguousarray(packed.numpy()))})
    return arrays, dict(own)
