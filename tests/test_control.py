"""Runs by address (fedpacs.server.coordinator.control) with a fake ``flwr``: the run
record (run.json), connection flags refused with the missing flag named, a status.json
left at running settled from Flower's status, resume, and `Federation.watch` when a
process of the federation dies."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedpacs.common.artifacts import write_json
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError, ExitCode, ProcessError
from fedpacs.common.signing import APP_SIGNATURE
from fedpacs.deploy.cli import main
from fedpacs.server import resume as resume_mod
from fedpacs.server.coordinator import control as ctl
from fedpacs.server.coordinator.control import (
    Control,
    FlowerRun,
    find_run_dir,
    mark_state,
    read_run_record,
    resolve_target,
    resume_run,
    run_status,
    start_run,
)
from fedpacs.server.coordinator.federation import (
    SUPERLINK,
    Federation,
    SiteState,
    Timeouts,
)
from fedpacs.server.coordinator.pki import Pki, provision
from fedpacs.server.rundir import read_status

CFG = RunConfig(task="breastmnist", rounds=5, min_sites=1, secagg=False)


class FakeControl:
    """What the run functions ask of a Control, with Flower's answers set by the test."""

    def __init__(self, home: Path, statuses: dict[int, FlowerRun] | None = None) -> None:
        self.home = home
        self.statuses = statuses or {}
        self.submitted: list[Path] = []
        self.stopped: list[int] = []
        self.next_id = 100

    def submit(self, app_dir: Path) -> int:
        self.submitted.append(app_dir)
        self.next_id += 1
        return self.next_id

    def flower_run(self, run_id: int) -> FlowerRun:
        return self.statuses.get(run_id, FlowerRun(run_id, "running"))

    def stop(self, run_id: int) -> None:
        self.stopped.append(run_id)

    def logs(self, run_id: int) -> str:
        return f"log of {run_id}"

    def check_reachable(self) -> None:
        pass


@pytest.fixture()
def pki(tmp_path: Path) -> Pki:
    return provision(tmp_path / "pki", sites=[])


def _started(tmp_path: Path, pki: Pki, fake: FakeControl) -> tuple[int, Path]:
    started = start_run(control=fake, cfg=CFG, runs_dir=tmp_path / "runs",  # type: ignore[arg-type]
                        apps_dir=tmp_path / "apps", app_key=pki.app_key,
                        artifact_key=pki.artifact_key)
    return started.run_id, started.run_dir


def _status_json(run_dir: Path, state: str, round_: int, rounds: int = 5) -> None:
    write_json(run_dir / "status.json", {"state": state, "round": round_, "rounds": rounds,
                                         "error": "", "updated": 0.0, "started": 1.0})


# ------------------------------------------------------------------ the run record
def test_run_start_by_address_records_the_flower_run_in_the_run_dir(tmp_path: Path,
                                                                    pki: Pki) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    (app,) = fake.submitted
    assert (app / APP_SIGNATURE).is_file()  # signed before it was submitted
    raw = json.loads((run_dir / "run.json").read_text())
    assert raw["format"] == "fedpacs-run/1" and raw["run_name"] == run_dir.name
    assert [e["run_id"] for e in raw["flower_runs"]] == [run_id]
    assert raw["flower_runs"][0]["after_round"] == -1 and raw["flower_runs"][0]["started"] > 0
    record = read_run_record(run_dir)
    assert record is not None and record.config.rounds == 5
    assert record.config.run_dir == str(run_dir) and record.latest_run_id == run_id
    server = json.loads((run_dir / "server.json").read_text())
    assert server["run_dir"] == str(run_dir) and server["artifact_key"] == str(pki.artifact_key)
    # found by its Flower run id alone, as `run status ID --runs-dir DIR` does
    assert find_run_dir(tmp_path / "runs", run_id) == run_dir
    with pytest.raises(ConfigError, match="run id"):
        find_run_dir(tmp_path / "runs", 999)


def test_a_bad_run_record_is_refused_with_its_file_named(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="run.json"):
        read_run_record(tmp_path)


# ------------------------------------------------------------------ connection flags
def test_connection_flags_name_what_is_missing(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "start", "--control", "127.0.0.1:9093", "--task", "breastmnist"])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    for flag in ("--ca", "--app-key", "--artifact-key", "--runs-dir"):
        assert f"{flag}: expected" in err, flag
    # files by address, without --control
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert main(["run", "status", "1", "--ca", str(ca)]) == ExitCode.CONFIG
    assert "--control: expected" in capsys.readouterr().err
    # both modes at once; a bad address; a missing file: all named together
    code = main(["run", "stop", "1", "--workdir", str(tmp_path), "--control", "nohost",
                 "--ca", str(tmp_path / "missing.pem")])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "--workdir: expected" in err and "--control: expected HOST:PORT" in err
    assert "missing.pem" in err
    # status by address needs the runs folder (where run.json says which folder is the run)
    assert main(["run", "status", "1", "--control", "127.0.0.1:9", "--ca", str(ca)]) \
        == ExitCode.CONFIG
    assert "--runs-dir: expected" in capsys.readouterr().err
    # resume needs the app key
    assert main(["run", "resume", str(tmp_path), "--control", "127.0.0.1:9", "--ca",
                 str(ca)]) == ExitCode.CONFIG
    assert "--app-key: expected" in capsys.readouterr().err


def test_resolve_target_modes(tmp_path: Path) -> None:
    assert resolve_target(command="c", workdir=None, control=None, ca=None) \
        == Path("runs/federation")
    assert resolve_target(command="c", workdir=tmp_path, control=None, ca=None) == tmp_path
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    target = resolve_target(command="c", workdir=None, control="[::1]:9093", ca=ca,
                            runs_dir=tmp_path, needs=frozenset({ctl.RUNS_DIR_FLAG}))
    assert isinstance(target, ctl.ByAddress)
    assert (target.connection.address.host, target.connection.address.port) == ("::1", 9093)
    assert str(target.connection) == "[::1]:9093" and target.runs_dir == tmp_path.resolve()


def test_an_unreachable_superlink_is_named_by_its_address(tmp_path: Path,
                                                          pki: Pki) -> None:
    from fedpacs.common.procs import free_port

    port = free_port()
    conn = ctl.ControlConnection(ctl.ListenAddress("127.0.0.1", port), pki.ca_cert)
    with Control.session(conn) as control, pytest.raises(ctl.SuperLinkUnreachable) as exc:
        control.flower_run(1)
    assert f"127.0.0.1:{port}" in str(exc.value) and exc.value.code == ExitCode.PROCESS
    assert "Fix:" in str(exc.value)


# ------------------------------------------------------------------ status, settled
@pytest.mark.parametrize(("flower", "state"), [("finished:failed", "failed"),
                                                ("finished:stopped", "interrupted"),
                                                ("finished:completed", "failed")])
def test_a_running_status_json_is_settled_from_flower(tmp_path: Path, pki: Pki, flower: str,
                                                      state: str) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    _status_json(run_dir, "running", 2)
    fake.statuses[run_id] = FlowerRun(run_id, flower, "ServerApp process died")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert st.reconciled and st.state == state and st.status == flower
    assert f"Flower status {flower} (ServerApp process died) at round 2 of 5" in st.error
    assert f"fedpacs run resume {run_dir}" in st.error
    written = read_status(run_dir)
    assert written["state"] == state and written["error"] == st.error
    assert (written["round"], written["rounds"], written["started"]) == (2, 5, 1.0)
    again = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert not again.reconciled and again.state == state


def test_a_status_json_is_left_alone_while_it_is_right(tmp_path: Path, pki: Pki) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    _status_json(run_dir, "running", 3)
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert (st.state, st.round, st.reconciled) == ("running", 3, False)  # Flower: running
    _status_json(run_dir, "finished", 5)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:completed")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert (st.state, st.reconciled) == ("finished", False)
    # an earlier Flower run of a resumed run says nothing about the run now
    ctl.record_flower_run(run_dir, CFG, 500, after_round=2)
    _status_json(run_dir, "running", 3)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:stopped")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert (st.state, st.reconciled) == ("running", False)


def test_a_failed_status_json_of_a_run_flower_says_was_stopped_reads_interrupted(
        tmp_path: Path, pki: Pki) -> None:
    """The operator's stop reached the ServerApp as an error it wrote as failed: Flower's
    word (stopped) settles it as interrupted, keeping what the ServerApp said; a failure
    Flower also calls a failure stays as it is."""
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    mark_state(run_dir, "failed", "ReadError", rounds=5)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:failed")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert (st.state, st.error, st.reconciled) == ("failed", "ReadError", False)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:stopped")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert (st.state, st.reconciled) == ("interrupted", True)
    assert "Flower status finished:stopped" in st.error and "last word: ReadError" in st.error
    assert f"fedpacs run resume {run_dir}" in st.error
    assert read_status(run_dir)["state"] == "interrupted"


def test_a_serverapp_gone_before_it_wrote_a_status_is_settled_too(tmp_path: Path,
                                                                   pki: Pki) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:failed")
    st = run_status(control=fake, run_id=run_id, run_dir=run_dir)  # type: ignore[arg-type]
    assert st.state == "failed" and "before it wrote its status" in st.error
    assert read_status(run_dir)["rounds"] == 5  # from run.json


@pytest.fixture()
def fake_flower(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, FlowerRun]]:
    """The real Control (and CLI) with Flower's answers replaced."""
    statuses: dict[int, FlowerRun] = {}
    submitted = iter(range(200, 300))
    monkeypatch.setattr(Control, "check_reachable", lambda self: None)
    monkeypatch.setattr(Control, "flower_run", lambda self, run_id: statuses.get(
        run_id, FlowerRun(run_id, "running")))
    monkeypatch.setattr(Control, "submit", lambda self, app: next(submitted))
    yield statuses


def test_run_status_cli_by_address_settles_and_says_why(
        tmp_path: Path, pki: Pki, fake_flower: dict[int, FlowerRun],
        capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    by = ["--control", "127.0.0.1:9093", "--ca", str(pki.ca_cert), "--runs-dir", str(runs)]
    assert main(["run", "start", *by, "--app-key", str(pki.app_key), "--artifact-key",
                 str(pki.artifact_key), "--task", "breastmnist", "--min-sites", "1",
                 "--no-secagg", "--rounds", "5"]) == 0
    out = capsys.readouterr().out
    assert "run 200 started" in out
    run_dir = find_run_dir(runs, 200)
    _status_json(run_dir, "running", 2)
    fake_flower[200] = FlowerRun(200, "finished:failed")
    assert main(["run", "status", "200", *by]) == 0
    captured = capsys.readouterr()
    st = json.loads(captured.out)
    assert st["state"] == "failed" and st["status"] == "finished:failed" and st["reconciled"]
    assert "at round 2 of 5" in captured.err and "fedpacs run resume" in captured.err


# ------------------------------------------------------------------ resume
def _fake_resume(monkeypatch: pytest.MonkeyPatch, run_dir: Path,
                 marks: list[int]) -> resume_mod.Resume:
    record = read_run_record(run_dir)
    assert record is not None
    resume = resume_mod.Resume(round=2, config=record.config, model_sha256="ab" * 32)
    monkeypatch.setattr(resume_mod, "load_resume",
                        lambda d: resume if d == run_dir.resolve() else None)
    monkeypatch.setattr(resume_mod, "mark_resume", lambda d, r: marks.append(r.round))
    return resume


def test_resume_writes_signs_submits_and_records_the_new_flower_run(
        tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    _status_json(run_dir, "interrupted", 2)
    marks: list[int] = []
    _fake_resume(monkeypatch, run_dir, marks)
    # while its Flower run still runs it is not resumed (two ServerApps, one folder)
    with pytest.raises(ConfigError, match=f"run stop {run_id}"):
        resume_run(control=fake, run_dir=run_dir, apps_dir=tmp_path / "apps",  # type: ignore[arg-type]
                   app_key=pki.app_key)
    fake.statuses[run_id] = FlowerRun(run_id, "finished:stopped")
    with pytest.raises(ConfigError, match="--runs-dir"):
        resume_run(control=fake, run_dir=run_dir, apps_dir=tmp_path / "apps",  # type: ignore[arg-type]
                   app_key=pki.app_key, runs_dir=tmp_path)
    assert marks == [] and len(fake.submitted) == 1
    resumed = resume_run(control=fake, run_dir=run_dir,  # type: ignore[arg-type]
                         apps_dir=tmp_path / "apps", app_key=pki.app_key,
                         runs_dir=tmp_path / "runs")
    assert (resumed.run_id, resumed.after_round, resumed.rounds) == (run_id + 1, 2, 5)
    assert marks == [2]
    app = fake.submitted[-1]
    assert (app / APP_SIGNATURE).is_file()
    app_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app_config["config"]["run-name"] == run_dir.name  # its ServerApp finds server.json
    record = read_run_record(run_dir)
    assert record is not None and record.run_ids == [run_id, run_id + 1]
    assert record.flower_runs[-1].after_round == 2
    assert read_status(run_dir)["state"] == "resuming"
    # a resumed ServerApp that dies at once is seen (status.json was settled to resuming)
    fake.statuses[run_id + 1] = FlowerRun(run_id + 1, "finished:failed")
    st = run_status(control=fake, run_id=run_id + 1, run_dir=run_dir)  # type: ignore[arg-type]
    assert st.state == "failed" and st.reconciled


def test_run_resume_cli_by_address(tmp_path: Path, pki: Pki,
                                   fake_flower: dict[int, FlowerRun],
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeControl(tmp_path)
    run_id, run_dir = _started(tmp_path, pki, fake)
    fake_flower[run_id] = FlowerRun(run_id, "finished:stopped")
    marks: list[int] = []
    _fake_resume(monkeypatch, run_dir, marks)
    assert main(["run", "resume", str(run_dir), "--control", "127.0.0.1:9093", "--ca",
                 str(pki.ca_cert), "--app-key", str(pki.app_key)]) == 0
    out = capsys.readouterr().out
    assert f"run 200 started: resumes {run_dir} after round 2 of 5" in out and marks == [2]
    record = read_run_record(run_dir)
    assert record is not None and record.run_ids == [run_id, 200]


# ------------------------------------------------------------------ watch
@pytest.fixture()
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait(timeout=30)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=60)
    return proc.pid


def _watched(tmp_path: Path, pki: Pki, superlink_pid: int, site_pid: int,
             statuses: list[str]) -> tuple[Federation, FakeControl, int, Path]:
    fed = Federation.new(tmp_path / "fed", pki, timeouts=Timeouts(status_every=0.0))
    fed.state.superlink_pid = superlink_pid
    fed.state.sites = {"site-a": SiteState("a.toml", "breastmnist", site_pid)}
    fake = FakeControl(tmp_path)
    answers = iter(statuses)
    fake.flower_run = lambda run_id: FlowerRun(run_id, next(answers))  # type: ignore[method-assign]
    fed.__dict__["control"] = fake  # the cached property, replaced
    run_id, run_dir = fed.start_run(replace(CFG))
    _status_json(run_dir, "running", 1)
    return fed, fake, run_id, run_dir


def test_watch_goes_on_when_a_site_daemon_dies(tmp_path: Path, pki: Pki,
                                               sleeper: int) -> None:
    fed, _, run_id, run_dir = _watched(
        tmp_path, pki, sleeper, _dead_pid(),
        ["running", "running", "finished:completed", "finished:completed"])
    gone: list[Any] = []
    _status_json(run_dir, "finished", 5)
    assert fed.watch(run_id, timeout_s=60, on_gone=gone.append) == "finished:completed"
    assert [g.name for g in gone] == ["supernode-site-a"]  # reported once
    assert read_status(run_dir)["state"] == "finished"
    assert (fed.log_dir / f"run-{run_id}.log").read_text() == f"log of {run_id}"


def test_watch_marks_the_run_interrupted_when_the_superlink_dies(tmp_path: Path, pki: Pki,
                                                                 sleeper: int) -> None:
    fed, _, run_id, run_dir = _watched(tmp_path, pki, _dead_pid(), sleeper, ["running"])
    with pytest.raises(ProcessError, match=SUPERLINK):
        fed.watch(run_id, timeout_s=60)
    st = read_status(run_dir)
    assert st["state"] == "interrupted" and st["round"] == 1
    assert SUPERLINK in st["error"] and "restart-superlink" in st["error"]
    assert f"fedpacs run resume {run_dir}" in st["error"]
    # and strict checks (as `federation up` waits) still raise for any process gone
    assert [g.name for g in fed.gone()] == [SUPERLINK]
    with pytest.raises(ProcessError):
        fed.check_alive(["supernode-site-a", SUPERLINK])


def test_stop_and_logs_by_address_refuse_a_run_of_another_runs_folder(
        tmp_path: Path, pki: Pki, fake_flower: dict[int, FlowerRun],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stopped: list[int] = []
    monkeypatch.setattr(Control, "stop", lambda self, run_id: stopped.append(run_id))
    monkeypatch.setattr(Control, "logs", lambda self, run_id: f"log of {run_id}")
    fake = FakeControl(tmp_path)
    run_id, _ = _started(tmp_path, pki, fake)
    by = ["--control", "127.0.0.1:9093", "--ca", str(pki.ca_cert)]
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert main(["run", "logs", str(run_id), *by, *runs]) == 0
    assert f"log of {run_id}" in capsys.readouterr().out
    assert main(["run", "stop", str(run_id + 7), *by, *runs]) == ExitCode.CONFIG
    assert "run id" in capsys.readouterr().err and stopped == []
    assert main(["run", "stop", str(run_id), *by, *runs]) == 0
    assert main(["run", "stop", "4242", *by]) == 0  # without --runs-dir: any run
    assert stopped == [run_id, 4242]
