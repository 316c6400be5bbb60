"""A stopped run continues from its last completed round's checkpoint.

* a FedAdam run stopped twice (between a round's checkpoint and its record, then by
  Ctrl-C as round 3 goes out) and resumed each time ends with the same model, the same
  records and the same evaluations as the run that was never stopped; under SecAgg+ too
  (stopped by SIGTERM);
* a checkpoint written while the writer is SIGKILLed is the old file or the new one;
* a truncated, tampered, foreign or missing checkpoint, a finished run and an empty run
  folder are refused with a coded error naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation import quantization
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.run import RunNotRunningException

from fedpacs.client.app import app as client_app
from fedpacs.common import wire
from fedpacs.common.artifacts import atomic_write, is_temp_of, load_model, write_json
from fedpacs.common.config import RunConfig, load_run_config
from fedpacs.common.contract import LEGACY_FIT_CONFIG
from fedpacs.common.errors import ConfigError, DataError, ExitCode, NoUpdateError
from fedpacs.common.hashing import sha256_file
from fedpacs.common.models import build_model
from fedpacs.server.app import FederatedRun, install_sigterm_handler, run_federation
from fedpacs.server.app import main as serverapp_main
from fedpacs.server.recorder import RoundRecord
from fedpacs.server.report import write_report
from fedpacs.server.resume import Resume, load_resume, mark_resume, open_checkpoint
from fedpacs.server.rundir import (
    RUNS_DIR_ENV,
    RunDirectory,
    read_server_side,
    read_status,
    round_folder,
)
from tests.loopback import LoopbackGrid, breastmnist_sites

pytestmark = pytest.mark.usefixtures("task_identity")

TASK = "breastmnist"


def _sites(tmp_path: Path, data_dir: Path) -> dict[int, Path]:
    """3 sites, each with a 1/12 share of BreastMNIST (45 training images: one batch)."""
    return breastmnist_sites(tmp_path, data_dir, num_partitions=12,
                             security="require_secagg = false\n")  # (the FedAdam run is plain)


def _cfg(runs: Path, name: str, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {"task": TASK, "rounds": 3, "local_epochs": 1, "batch_size": 64,
                            "min_sites": 3, "round_timeout_s": 60.0, "cross_site": False,
                            "secagg": False, "strategy": "fedadam", "server_lr": 0.01,
                            "run_dir": str(runs / name), "run_name": name}
    return RunConfig(**(base | kw))


def _context() -> Context:
    return Context(1, 0, {}, RecordDict(), {})


def _resumed_config(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> RunConfig:
    """What `fedpacs run resume` and the next ServerApp make of the run: load_resume and
    mark_resume, then the config the ServerApp's main() builds from the run's app (its
    non-server fields) and its server.json, found under the runs folder by run name."""
    resume = load_resume(run_dir)
    mark_resume(run_dir, resume)
    monkeypatch.setenv(RUNS_DIR_ENV, str(run_dir.parent))
    server_side = read_server_side(resume.config.run_name)
    assert server_side["resume_from"] == resume.round
    flat = resume.config.to_app_config() | {k.replace("_", "-"): v
                                            for k, v in server_side.items()}
    return RunConfig.from_flat(flat)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((run_dir / "metrics.json").read_text())["rounds"])


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(run_dir / "final" / "model.pt", device="cpu")
    return model.state_dict()


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *,
                       atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), k


def _plain_round(msg: Message) -> int:
    value = msg.content.config_records[wire.CONFIG_KEY]["server-round"]
    assert isinstance(value, int)
    return value


class Seen:
    """A LoopbackGrid ``drop`` hook that drops nothing and notes each message's (type,
    server-round) as it is delivered (Flower reuses one ConfigRecord across rounds, so
    a message kept until later shows a later round); ``stop_at`` raises Ctrl-C as the
    first message of that round goes out."""

    def __init__(self, stop_at: int = 0) -> None:
        self.stop_at = stop_at
        self.rounds: list[tuple[str, int]] = []

    def __call__(self, nid: int, msg: Message) -> bool:
        seen = (msg.metadata.message_type, _plain_round(msg))
        if not self.rounds or self.rounds[-1] != seen:
            self.rounds.append(seen)
        if seen == ("train", self.stop_at):
            raise KeyboardInterrupt
        return False



def _http_error(status: int) -> httpx.HTTPStatusError:
    """What Flower's HTTP grid raises for a runtime call the SuperLink answered with
    ``status`` (httpx's raise_for_status)."""
    request = httpx.Request("POST", "http://127.0.0.1:9091/v1/runtime/pull-messages")
    return httpx.HTTPStatusError(f"HTTP {status}", request=request,
                                 response=httpx.Response(status, request=request))


@pytest.mark.parametrize(("raised", "state", "error"), [
    (lambda: RunNotRunningException(), "interrupted",
     "the SuperLink stopped the run (RunNotRunningException)"),
    (lambda: _http_error(401), "interrupted",
     "the SuperLink stopped the run (HTTPStatusError)"),
    (lambda: _http_error(500), "failed", "HTTPStatusError")],
    ids=["403-run-not-running", "401-token-revoked", "500"])
def test_the_superlinks_stop_met_in_a_grid_call_reads_interrupted(
        tmp_path: Path, data_dir: Path, raised: Any, state: str, error: str) -> None:
    """`fedpacs run stop` revokes the ServerApp's task token: Flower's HTTP grid raises
    RunNotRunningException (403) or, once its retry invoker has sent the SIGINT, the 401
    itself. Met in round 2's exchange, either reads interrupted (resumable from round 1),
    as the SIGINT does; any other HTTP error is a failure."""
    cfg = _cfg(tmp_path / "runs", "stopped")

    def stop_at_round_2(nid: int, msg: Message) -> bool:
        if _plain_round(msg) == 2:
            raise raised()
        return False

    with pytest.raises(BaseException) as exc:
        run_federation(LoopbackGrid(client_app, _sites(tmp_path, data_dir),
                                    drop=stop_at_round_2), cfg, _context())
    assert type(exc.value) is type(raised())
    status = read_status(Path(cfg.run_dir))
    assert (status["state"], status["error"], status["round"]) == (state, error, 1)


def test_a_run_in_which_no_round_changed_the_model_fails_and_publishes_nothing(
        tmp_path: Path, data_dir: Path) -> None:
    """Every site's own policy requires SecAgg+ and the run is plain: each refuses every
    round. The run ends failed (NoUpdateError, exit code 12), naming each round and what
    its record says; no final model is written, so nothing can be signed or pulled."""
    sites = breastmnist_sites(tmp_path, data_dir, num_partitions=12)  # SecAgg+ required
    cfg = _cfg(tmp_path / "runs", "refused", rounds=2, strategy="fedavg")
    with pytest.raises(NoUpdateError) as exc:
        run_federation(LoopbackGrid(client_app, sites), cfg, _context())
    assert exc.value.code == ExitCode.NO_UPDATE
    said = str(exc.value)
    assert "no round of the 2 changed the global model" in said
    for n in (1, 2):  # each site's refusal by its code, never its words
        assert f"round {n}: 0 site(s) trained; 3 answered FP010 PolicyError" in said
    assert "FP010: A site refused what the coordinator asked" in said
    assert "require_secagg" not in said
    assert _records(Path(cfg.run_dir))[1]["site_errors"] == {"FP010 PolicyError": 3}
    run_dir = Path(cfg.run_dir)
    status = read_status(run_dir)
    assert (status["state"], status["error"], status["round"]) == ("failed", "NoUpdateError", 2)
    assert status["detail"] == said
    assert not (run_dir / "final").exists()


def test_a_round_no_site_answered_is_named_in_the_model_card(tmp_path: Path,
                                                              data_dir: Path) -> None:
    """No site answers round 2 in time: the run goes on and finishes, and the model card
    names round 2 as the one that left the global model as it was."""
    def mute_round_2(nid: int, msg: Message) -> bool:
        return msg.metadata.message_type == "train" and _plain_round(msg) == 2

    cfg = _cfg(tmp_path / "runs", "mute", strategy="fedavg", round_timeout_s=3.0)
    run_federation(LoopbackGrid(client_app, _sites(tmp_path, data_dir), drop=mute_round_2),
                   cfg, _context())
    run_dir = Path(cfg.run_dir)
    assert read_status(run_dir)["state"] == "finished"
    card = json.loads((run_dir / "final" / "model_card.json").read_text())
    assert card["rounds_unchanged"] == [2]
    hashes = [r["weights_sha256"] for r in _records(run_dir)]
    assert hashes[2] == hashes[1] and len(set(hashes)) == 3
    # had no site answered its cross-site validation, the report says so and draws nothing
    card["cross_site"] = {"global": {}}
    write_json(run_dir / "final" / "model_card.json", card)
    write_report(run_dir)
    assert "No site answered the cross-site validation." in \
        (run_dir / "report" / "index.html").read_text()
    assert not (run_dir / "report" / "cross_site.png").exists()


def test_a_fedadam_run_stopped_twice_and_resumed_ends_as_the_unstopped_run(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = _sites(tmp_path, data_dir)
    runs = tmp_path / "runs"
    whole = _cfg(runs, "whole")
    run_federation(LoopbackGrid(client_app, sites), whole, _context())

    cfg = _cfg(runs, "stopped")
    run_dir = Path(cfg.run_dir)
    # 1. the ServerApp dies after round 2's checkpoint, before its record
    append = RunDirectory.append_round

    def die_at_round_2(self: RunDirectory, record: RoundRecord) -> None:
        if record.round == 2:
            raise KeyboardInterrupt
        append(self, record)

    with monkeypatch.context() as m:
        m.setattr(RunDirectory, "append_round", die_at_round_2)
        with pytest.raises(KeyboardInterrupt):
            run_federation(LoopbackGrid(client_app, sites), cfg, _context())
    status = read_status(run_dir)
    assert (status["state"], status["round"]) == ("interrupted", 1)
    assert status["error"] == "KeyboardInterrupt (SIGINT)"
    assert [r["round"] for r in _records(run_dir)] == [0, 1]
    assert (round_folder(run_dir, 2) / "model.pt").is_file()  # checkpointed, unrecorded
    resume = load_resume(run_dir)
    assert resume.round == 1 and resume.config == cfg
    assert resume.model_sha256 == _records(run_dir)[1]["model_sha256"]

    # 2. resumed after round 1, stopped by Ctrl-C as round 3's messages go out
    resumed = _resumed_config(run_dir, monkeypatch)
    assert resumed == replace(cfg, resume_from=1)
    seen = Seen(stop_at=3)
    run = FederatedRun(LoopbackGrid(client_app, sites, drop=seen), resumed, _context())
    assert not (round_folder(run_dir, 2)).exists()  # the unrecorded round is dropped
    with pytest.raises(KeyboardInterrupt):
        run.run()
    assert seen.rounds == [("train", 2), ("train", 3)]  # the run's own round numbers
    status = read_status(run_dir)
    assert (status["state"], status["round"]) == ("interrupted", 2)
    assert [r["round"] for r in _records(run_dir)] == [0, 1, 2]

    # 3. resumed after round 2 through the ServerApp's main(), as Flower starts it for
    # the app `fedpacs run resume` submits (the run's own app config): it learns where to
    # go on from the run's server.json alone (the app's own say is ignored)
    resume = load_resume(run_dir)
    assert resume.round == 2
    mark_resume(run_dir, resume)
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs))
    app_config = resume.config.to_app_config() | {"resume-from": 0}
    seen = Seen()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        serverapp_main(LoopbackGrid(client_app, sites, drop=seen),
                       Context(1, 0, {}, RecordDict(), app_config))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen.rounds == [("train", 3), ("evaluate", 3)]
    assert read_status(run_dir)["state"] == "finished"

    # (in node order the two runs agree to the last bit; 1e-7 leaves room for a platform)
    _assert_same_model(_final(Path(whole.run_dir)), _final(run_dir), atol=1e-7)
    for k in (2, 3):  # FedAdam's moments went on from where they were
        a, b = (torch.load(round_folder(d, k) / "strategy.pt", weights_only=True)["state"]
                for d in (run_dir, Path(whole.run_dir)))
        assert set(a) == {"m_t/fedpacs-state", "v_t/fedpacs-state"} == set(b)
        _assert_same_model(a, b, atol=1e-7)
    ours, theirs = _records(run_dir), _records(Path(whole.run_dir))
    assert [r["round"] for r in ours] == [0, 1, 2, 3]
    for a, b in zip(ours, theirs, strict=True):
        assert a["model_sha256"] and a["strategy_sha256"]
        assert set(a["evaluate_sites"]) == {"site-0", "site-1", "site-2"}
        assert a["evaluate"] == pytest.approx(b["evaluate"], abs=1e-6)
        if a["round"] > 0:
            assert a["train"]["train-loss"] == pytest.approx(b["train"]["train-loss"],
                                                             abs=1e-6)
    for k in range(4):  # each round's own file is its run record
        one = json.loads((round_folder(run_dir, k) / "metrics.json").read_text())
        assert one == ours[k]
    card = json.loads((run_dir / "final" / "model_card.json").read_text())
    whole_card = json.loads((Path(whole.run_dir) / "final" / "model_card.json").read_text())
    assert card["sites"] == whole_card["sites"] and card["resumed_from"] == 2
    assert len(card["exchanges"]) == len(whole_card["exchanges"]) == 4  # 3 train + 1 eval
    with pytest.raises(ConfigError) as exc:  # finished: nothing left to resume
        load_resume(run_dir)
    assert int(exc.value.code) == ExitCode.CONFIG == 3
    assert "nothing to resume" in str(exc.value)


@pytest.fixture()
def rounding_to_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's SecAgg+ quantises each site's update with stochastic rounding (numpy's
    global random state), 2e-4 apart between two runs at these sample counts: to nearest
    instead, two runs of one config give the same sums (the masks cancel exactly)."""
    def nearest(arr: np.ndarray) -> np.ndarray:
        return np.asarray(np.floor(np.asarray(arr) + 0.5), dtype=np.int32)

    monkeypatch.setattr(quantization, "_stochastic_round", nearest)


@pytest.mark.usefixtures("rounding_to_nearest")
def test_secagg_resume_continues_the_round_numbers_and_the_model(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = _sites(tmp_path, data_dir)
    runs = tmp_path / "runs"
    secure = {"secagg": True, "strategy": "fedavg", "rounds": 2}
    whole = _cfg(runs, "whole", **secure)
    run_federation(LoopbackGrid(client_app, sites), whole, _context())

    cfg = _cfg(runs, "stopped", **secure)
    run_dir = Path(cfg.run_dir)
    pushes: list[int] = []

    def sigterm_at_round_2(nid: int, msg: Message) -> bool:  # round 1 is 4 stages
        if len(grid.pushes) == 5 and not pushes:
            pushes.append(len(grid.pushes))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, in the main thread
        return False

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert install_sigterm_handler()
        grid = LoopbackGrid(client_app, sites, drop=sigterm_at_round_2)
        with pytest.raises(SystemExit) as stopped:
            run_federation(grid, cfg, _context())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    status = read_status(run_dir)
    assert (status["state"], status["error"], status["round"]) == ("interrupted", "SIGTERM", 1)

    grid = LoopbackGrid(client_app, sites)
    FederatedRun(grid, _resumed_config(run_dir, monkeypatch), _context()).run()
    stages = [m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
              for p in grid.pushes for m in p[:1]
              if RECORD_KEY_CONFIGS in m.content.config_records]
    assert stages == [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS,
                      Stage.UNMASK]  # one SecAgg+ round, then the final evaluation
    fit = [m.content.config_records[LEGACY_FIT_CONFIG] for p in grid.pushes for m in p
           if LEGACY_FIT_CONFIG in m.content.config_records]
    assert fit and {c["server-round"] for c in fit} == {2}
    assert read_status(run_dir)["state"] == "finished"
    ours = _records(run_dir)
    assert [r["round"] for r in ours] == [0, 1, 2]
    assert all("evaluate" in r for r in ours) and ours[2]["secagg"]["sites_summed"] == 3
    # the same masked sums of the same local models
    _assert_same_model(_final(Path(whole.run_dir)), _final(run_dir), atol=1e-7)


# --------------------------------------------------------------------------- a kill mid-write
WRITER = """
import sys
from pathlib import Path

import torch

from fedpacs.common.artifacts import save_tensors

path = Path(sys.argv[1])
version = int(sys.argv[2])
while True:
    version += 1
    state = {f"w{i}": torch.full((512, 1024), float(version)) for i in range(8)}
    digest = save_tensors(path, {"version": version, "state": state})
    print(version, digest, flush=True)
"""


def test_a_checkpoint_killed_mid_write_is_the_old_or_the_new_file(tmp_path: Path) -> None:
    """A writer saving 16 MiB checkpoints in a loop is SIGKILLed at random moments: the
    file under the checkpoint's name always loads whole, as the last version reported
    written or the one after it; temp files never take its name."""
    path = tmp_path / "rounds" / "round-001" / "strategy.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(7)
    last, last_digest = 0, ""
    for _ in range(5):
        with subprocess.Popen([sys.executable, str(script), str(path), str(last)],
                              stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60.0)  # the first write
            if not ready:
                proc.kill()
                pytest.fail("the writer wrote no checkpoint within 60 s")
            first = proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            out = first + proc.stdout.read()
            assert proc.wait(timeout=30) == -signal.SIGKILL
        done = [line.split() for line in out.splitlines()]
        last, last_digest = int(done[-1][0]), done[-1][1]
        payload = torch.load(path, map_location="cpu", weights_only=True)
        version = payload["version"]
        assert version in (last, last + 1)  # the old file or the new one, whole
        assert all(torch.equal(t, torch.full((512, 1024), float(version)))
                   for t in payload["state"].values())
        if version == last:
            assert sha256_file(path) == last_digest
        else:
            last, last_digest = version, sha256_file(path)
        stray = [p for p in path.parent.iterdir() if p != path]
        assert all(is_temp_of(p, path) and p.name.startswith(".") for p in stray)
    assert last >= 5


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_json(path, {"state": "running"})

    def half(f: Any) -> None:
        f.write(b'{"state": "fin')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


# --------------------------------------------------------------------------- refusals
def _stopped_run(runs: Path, name: str, rounds: int = 2, **kw: Any) -> RunConfig:
    """A run folder as a ServerApp leaves it when stopped after ``rounds - 1``:
    run-config.json, checkpointed and recorded rounds 0..rounds-1, status interrupted."""
    cfg = _cfg(runs, name, **kw)
    run = RunDirectory(Path(cfg.run_dir), task=cfg.task_config(), config=cfg.to_flat())
    run.write_run_config(cfg.to_flat())
    model = build_model(cfg.task_config(), seed=cfg.seed)
    for k in range(rounds):
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
        run.save_round(model, RoundRecord(k))
    run.set_status("interrupted", round_=rounds - 1, total=cfg.rounds, error="SIGTERM")
    return cfg


def test_load_resume_finds_the_last_recorded_round(tmp_path: Path) -> None:
    cfg = _stopped_run(tmp_path, "run")
    run_dir = Path(cfg.run_dir)
    # a round checkpointed but never recorded (a kill between the two) is not completed
    shutil.copytree(round_folder(run_dir, 1), round_folder(run_dir, 2))
    resume = load_resume(run_dir)
    assert resume == Resume(1, cfg, sha256_file(round_folder(run_dir, 1) / "model.pt"))
    mark_resume(run_dir, resume)
    server = json.loads((run_dir / "server.json").read_text())
    assert server["resume_from"] == 1 and server["run_dir"] == cfg.run_dir
    assert "resume-from" not in cfg.to_app_config()  # never travels to a site
    checkpoint = open_checkpoint(RunConfig.from_flat(cfg.to_flat() | {"resume-from": 1}))
    assert checkpoint.round == 1 and [r["round"] for r in checkpoint.records] == [0, 1]
    model = build_model(cfg.task_config())
    model.load_state_dict(checkpoint.state_dict)
    assert np.array_equal(wire.model_to_arrays(model)[wire.PACKED_KEY].numpy(),
                          checkpoint.global_arrays[wire.PACKED_KEY].numpy())


def _refused(run_dir: Path, kind: type[ConfigError] | type[DataError]) -> str:
    with pytest.raises(kind) as exc:
        load_resume(run_dir)
    assert int(exc.value.code) == (ExitCode.CONFIG if kind is ConfigError else ExitCode.DATA)
    return str(exc.value)


def test_a_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    run_dir = Path(_stopped_run(tmp_path, "run").run_dir)
    model = round_folder(run_dir, 1) / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    message = _refused(run_dir, DataError)
    assert str(model) in message and "round 1" in message
    assert "Fix: restore the file from a backup, or start the run again" in message


def test_a_tampered_checkpoint_of_an_earlier_round_is_refused(tmp_path: Path) -> None:
    """A recorded round whose files changed is never silently dropped, however old."""
    run_dir = Path(_stopped_run(tmp_path, "run", rounds=3).run_dir)
    strategy = round_folder(run_dir, 1) / "strategy.pt"
    payload = torch.load(strategy, weights_only=True)
    payload["state"]["m_t/fedpacs-state"] = torch.zeros(3)
    torch.save(payload, strategy)
    message = _refused(run_dir, DataError)
    assert str(strategy) in message and "SHA-256" in message and "Fix:" in message


def test_a_missing_last_checkpoint_is_refused(tmp_path: Path) -> None:
    run_dir = Path(_stopped_run(tmp_path, "run").run_dir)
    model = round_folder(run_dir, 1) / "model.pt"
    model.unlink()
    message = _refused(run_dir, DataError)
    assert str(model) in message and "no such file" in message


def test_a_checkpoint_copied_from_another_run_is_refused(tmp_path: Path) -> None:
    run_dir = Path(_stopped_run(tmp_path, "run").run_dir)
    other = Path(_stopped_run(tmp_path, "other").run_dir)
    target = round_folder(run_dir, 1) / "model.pt"
    shutil.copy(round_folder(other, 1) / "model.pt", target)
    message = _refused(run_dir, ConfigError)
    assert str(target) in message and "config.run-name" in message
    assert "written by another run" in message and "Fix:" in message


def test_a_finished_run_is_refused(tmp_path: Path) -> None:
    cfg = _stopped_run(tmp_path, "run")
    run = RunDirectory(Path(cfg.run_dir), task=cfg.task_config(), config=cfg.to_flat())
    run.set_status("finished", round_=2, total=2)
    message = _refused(run.root, ConfigError)
    assert str(run.root / "status.json") in message and "Fix: nothing to resume" in message
    run.set_status("interrupted", round_=1, total=2)  # the final model alone says it too
    run.save_final(build_model(cfg.task_config()), {})
    assert str(run.root / "final" / "model.pt") in _refused(run.root, ConfigError)


def test_a_run_folder_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _refused(empty, ConfigError)
    assert str(empty / "run-config.json") in message and "fedpacs run start" in message
    assert "no such folder" in _refused(tmp_path / "nowhere", ConfigError)
    cfg = _stopped_run(tmp_path, "run", rounds=0)  # stopped before round 0's checkpoint
    message = _refused(Path(cfg.run_dir), ConfigError)
    assert str(Path(cfg.run_dir) / "metrics.json") in message


def test_a_resumed_serverapp_checks_its_config_and_round(tmp_path: Path) -> None:
    cfg = _stopped_run(tmp_path, "run")
    with pytest.raises(ConfigError) as exc:  # another config than the run started with
        open_checkpoint(RunConfig.from_flat(cfg.to_flat() | {"resume-from": 1, "lr": 0.5}))
    assert [e.field for e in exc.value.errors] == ["config.lr"]
    with pytest.raises(ConfigError) as exc:  # a stale resume marker
        FederatedRun(LoopbackGrid(client_app, {}), replace(cfg, resume_from=0), _context())
    assert [e.field for e in exc.value.errors] == ["resume-from"]
    status = read_status(Path(cfg.run_dir))  # the run says why it did not go on
    assert (status["state"], status["round"], status["error"]) == ("failed", 1, "ConfigError")
    assert load_resume(Path(cfg.run_dir)).round == 1  # ... and can still be resumed


def test_resume_from_is_set_by_resume_alone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_run_config(None, {"resume_from": 2})
    assert [e.field for e in exc.value.errors] == ["resume-from"]
    assert "fedpacs run resume" in str(exc.value)
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\ntask = "breastmnist"\nresume_from = 2\n')
    with pytest.raises(ConfigError):
        load_run_config(toml, {})
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"rounds": 3, "resume-from": 4})
    assert [e.field for e in exc.value.errors] == ["resume-from"]
    cfg = RunConfig(resume_from=2)
    assert "resume-from" not in cfg.to_app_config() and cfg.server_side()["resume_from"] == 2


def test_a_run_stopped_after_its_last_round_only_finishes(
        tmp_path: Path, data_dir: Path) -> None:
    """Stopped between its last round and its final model: no round is trained again,
    the sites evaluate the last round's model and the final model is that model."""
    cfg = _stopped_run(tmp_path / "runs", "run", rounds=4)  # rounds 0..3 of 3
    run_dir = Path(cfg.run_dir)
    seen = Seen()
    grid = LoopbackGrid(client_app, _sites(tmp_path, data_dir), drop=seen)
    FederatedRun(grid, replace(load_resume(run_dir).config, resume_from=3), _context()).run()
    assert seen.rounds == [("evaluate", 3)]
    assert read_status(run_dir)["state"] == "finished"
    last, _ = load_model(round_folder(run_dir, 3) / "model.pt", device="cpu")
    _assert_same_model(last.state_dict(), _final(run_dir), atol=0.0)
    assert [r["round"] for r in _records(run_dir)] == [0, 1, 2, 3]
    assert "evaluate" in _records(run_dir)[3]
