"""Runs through the SuperLink's Control API, by address: the ``flwr`` CLI against one TLS
connection, run start/status/stop/logs/resume, and each run's record (``RUN_DIR/run.json``).

`fedpacs run ... --control HOST:PORT --ca FILE` uses these with no federation.json (the
connection comes from flags, the ``flwr`` CLI gets a private FLWR_HOME per command);
:class:`~fedpacs.server.coordinator.federation.Federation` uses the same functions for the
SuperLink it started. The Control API has no authentication: it listens on the
coordinator's loopback only (see fedpacs.server.superlink), so these run on that host.

A run's state as the ServerApp wrote it (status.json) is never shown stale: when Flower
says the run's latest ServerApp finished but status.json still says running,
:func:`run_status` writes (and reports) ``interrupted`` (Flower stopped it) or ``failed``
with the reason, and a SuperLink that cannot be reached is an error naming its address.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpacs.common.artifacts import write_json
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError, DeadlineError, FieldError, ProcessError
from fedpacs.common.procs import child_env, port_open, tool
from fedpacs.common.signing import sign_app
from fedpacs.server.coordinator.bundle import write_app
from fedpacs.server.rundir import (
    SERVER_SIDE_FILE,
    STATUS_FILE,
    read_rounds,
    read_status,
    write_server_side,
)
from fedpacs.server.superlink import ListenAddress, parse_address

CONNECTION = "fedpacs"  # the one connection in FLWR_HOME/config.toml
RUN_RECORD = "run.json"
RUN_RECORD_FORMAT = "fedpacs-run/1"
FINAL_STATES = frozenset({"finished", "failed", "interrupted"})  # status.json, settled
ACTIVE = ("pending", "starting", "running")  # Flower statuses of a run not yet finished
CLI_TIMEOUT_S = 120.0
UNAVAILABLE = "Connection to the SuperLink is unavailable"  # flwr's words (pinned in test_gate)


# ---------------------------------------------------------------------------- connection
@dataclass(frozen=True)
class ControlConnection:
    """The SuperLink's Control API (``HOST:PORT``, e.g. 127.0.0.1:9093) and the CA its TLS
    certificate is checked against."""

    address: ListenAddress
    ca_cert: Path

    def __str__(self) -> str:
        return str(self.address)


def write_flwr_home(home: Path, *, address: str, ca_cert: Path) -> None:
    """A Flower config (FLWR_HOME/config.toml) with one TLS connection to our SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert.resolve()}"\n', encoding="utf-8")


class SuperLinkUnreachable(ProcessError):
    """Nothing answers at the SuperLink's Control API address."""


@dataclass(frozen=True)
class FlowerRun:
    """A run as Flower reports it: ``status`` such as running, finished:completed,
    finished:stopped, finished:failed (``unknown`` when the SuperLink has no such run)."""

    run_id: int
    status: str
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


class Control:
    """The ``flwr`` CLI against one SuperLink: FLWR_HOME (``home``) holds the one TLS
    connection; ``source`` names where the address came from in errors."""

    def __init__(self, connection: ControlConnection, home: Path, *,
                 timeout_s: float = CLI_TIMEOUT_S, cwd: Path | None = None,
                 source: str = "--control") -> None:
        self.connection = connection
        self.home = home
        self.timeout_s = timeout_s
        self.cwd = cwd or home
        self.source = source
        write_flwr_home(home, address=str(connection.address), ca_cert=connection.ca_cert)

    @classmethod
    @contextlib.contextmanager
    def session(cls, connection: ControlConnection, *, timeout_s: float = CLI_TIMEOUT_S
                ) -> Iterator[Control]:
        """A Control with a private FLWR_HOME, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="fedpacs-flwr-") as home:
            yield cls(connection, Path(home), timeout_s=timeout_s)

    def env(self) -> dict[str, str]:
        return child_env({"FLWR_HOME": str(self.home)})

    def unreachable(self, got: str) -> SuperLinkUnreachable:
        addr = self.connection.address
        return SuperLinkUnreachable(str(FieldError(
            self.source, f"a SuperLink Control API listening on {addr}", got,
            "start the SuperLink (`fedpacs federation up`, or `fedpacs federation "
            "restart-superlink` after it died), or correct the address")))

    def check_reachable(self) -> None:
        """Raise SuperLinkUnreachable when nothing listens at the Control API address."""
        addr = self.connection.address
        if not port_open(addr.host, addr.port):
            raise self.unreachable(f"nothing answering at {addr} (connection refused or "
                                   "timed out)")

    def flwr(self, *args: str, timeout_s: float | None = None) -> str:
        """Run the ``flwr`` CLI against this SuperLink; returns stdout or raises ProcessError
        (SuperLinkUnreachable when nothing listens at the address)."""
        self.check_reachable()
        argv = [tool("flwr"), *args]
        try:
            res = subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                                 timeout=timeout_s or self.timeout_s, cwd=self.cwd,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise DeadlineError(f"`flwr {' '.join(args)}` against {self.connection} did not "
                                f"finish within {exc.timeout:.0f}s") from exc
        if res.returncode != 0:
            raise ProcessError(f"`flwr {' '.join(args)}` against {self.connection} failed "
                               f"(exit {res.returncode}):\n"
                               f"{(res.stdout + res.stderr).strip()[-2000:]}")
        return res.stdout

    def flwr_json(self, *args: str) -> Any:
        """``flwr ARGS --format json``: its JSON, or ProcessError when it says it failed
        (``flwr`` exits 0 then; SuperLinkUnreachable when it could not connect)."""
        out = self.flwr(*args, "--format", "json")
        start = out.find("{")
        try:
            res = json.loads(out[start:])
        except json.JSONDecodeError as exc:
            raise ProcessError(f"`flwr {' '.join(args)}` printed no JSON: {out[-500:]}") from exc
        if isinstance(res, dict) and res.get("success") is False:
            why = str(res.get("error-message", res)).strip()
            if UNAVAILABLE in why:
                raise self.unreachable(f"no connection at {self.connection.address} "
                                       f"(`flwr {args[0]}`: {why.splitlines()[-1]})")
            raise ProcessError(f"`flwr {' '.join(args)}` against {self.connection} failed: "
                               f"{why[-2000:]}")
        return res

    # ------------------------------------------------------------------ runs
    def submit(self, app_dir: Path) -> int:
        """Hand an app folder to the SuperLink as a run; returns the run id."""
        res = self.flwr_json("run", str(app_dir), CONNECTION)
        if not res.get("success") or "run-id" not in res:
            raise ProcessError(f"flwr run refused the app: {res}")
        return int(res["run-id"])

    def flower_run(self, run_id: int) -> FlowerRun:
        res = self.flwr_json("list", "--run-id", str(run_id), CONNECTION)
        runs = res.get("runs", [])
        if not runs:
            return FlowerRun(run_id, "unknown")
        details = str(runs[0].get("status-details", ""))
        return FlowerRun(run_id, str(runs[0].get("status", "unknown")),
                         "" if details == "N/A" else details)

    def stop(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), CONNECTION)

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    # ------------------------------------------------------------------ nodes
    def register(self, public_key: Path, name: str) -> int:
        res = dict(self.flwr_json("supernode", "register", str(public_key), CONNECTION,
                                  "--name", name))
        return int(res["node-id"])

    def unregister(self, node_id: int) -> None:
        self.flwr("supernode", "unregister", str(node_id), CONNECTION)

    def list_nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("supernode", "list", CONNECTION).get("nodes", []))


# ---------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class ByAddress:
    """`fedpacs run ...` against a SuperLink given by flags (no federation.json): its
    Control API and the coordinator-side files a command needs (None: not given)."""

    connection: ControlConnection
    runs_dir: Path | None = None
    app_key: Path | None = None
    artifact_key: Path | None = None


APP_KEY_FLAG, ARTIFACT_KEY_FLAG, RUNS_DIR_FLAG = "--app-key", "--artifact-key", "--runs-dir"
DEFAULT_WORKDIR = Path("runs/federation")


def resolve_target(*, command: str, workdir: Path | None, control: str | None,
                   ca: Path | None, app_key: Path | None = None,
                   artifact_key: Path | None = None, runs_dir: Path | None = None,
                   needs: frozenset[str] = frozenset()) -> Path | ByAddress:
    """The federation folder (``--workdir``, the default) or, with ``--control``, the
    connection and files given by flags; ``needs`` names the flags ``command`` cannot do
    without in that mode (of --app-key, --artifact-key, --runs-dir). Every problem is
    reported at once (ConfigError naming each flag)."""
    given = {"--ca": ca, APP_KEY_FLAG: app_key, ARTIFACT_KEY_FLAG: artifact_key,
             RUNS_DIR_FLAG: runs_dir}
    errs: list[FieldError] = []
    if control is None:
        extra = [f for f, v in given.items() if v is not None]
        if extra:
            errs.append(FieldError("--control", f"HOST:PORT of the SuperLink's Control API "
                                   f"with {', '.join(extra)}", "nothing",
                                   "pass --control 127.0.0.1:PORT, or use --workdir alone"))
            raise ConfigError(command, errs)
        return workdir or DEFAULT_WORKDIR
    if workdir is not None:
        errs.append(FieldError("--workdir", "either --workdir or --control, not both",
                               f"--workdir {workdir} and --control {control}",
                               "drop one of them"))
    address: ListenAddress | None = None
    try:
        address = parse_address(control, field="--control", example="127.0.0.1:9093")
    except ConfigError as err:
        errs += err.errors
    what = {"--ca": "the CA file the SuperLink's TLS certificate is checked against",
            APP_KEY_FLAG: "the app-signing private key (sites run only apps it signed)",
            ARTIFACT_KEY_FLAG: "the artifact-signing private key the ServerApp signs the "
                               "run's results with",
            RUNS_DIR_FLAG: "the runs folder the SuperLink was started with "
                           "(FEDPACS_RUNS_DIR; WORKDIR/runs for `fedpacs federation up`)"}
    fixes = {"--ca": "--ca PKI/ca.pem", APP_KEY_FLAG: "--app-key PKI/app-signing.key",
             ARTIFACT_KEY_FLAG: "--artifact-key PKI/artifact-signing.key",
             RUNS_DIR_FLAG: "--runs-dir WORKDIR/runs"}
    for flag in ("--ca", *sorted(needs)):
        value = given[flag]
        if value is None:
            errs.append(FieldError(flag, f"{what[flag]} (with --control)", "nothing",
                                   f"pass {fixes[flag]}"))
    for flag, value in given.items():
        if value is None:
            continue
        ok = value.is_dir() if flag == RUNS_DIR_FLAG else value.is_file()
        if not ok:
            errs.append(FieldError(flag, f"{what[flag]}: an existing "
                                   f"{'folder' if flag == RUNS_DIR_FLAG else 'file'}",
                                   str(value), f"check the path ({fixes[flag]})"))
    if errs:
        raise ConfigError(command, errs)
    assert address is not None and ca is not None
    return ByAddress(ControlConnection(address, ca.resolve()),
                     runs_dir=runs_dir.resolve() if runs_dir else None,
                     app_key=app_key.resolve() if app_key else None,
                     artifact_key=artifact_key.resolve() if artifact_key else None)


# ---------------------------------------------------------------------------- run record
@dataclass(frozen=True)
class FlowerRunEntry:
    """One Flower run of a fedpacs run: its start (``after_round`` -1) or a resume
    (continuing after ``after_round``)."""

    run_id: int
    started: float
    after_round: int = -1


@dataclass(frozen=True)
class RunRecord:
    """``RUN_DIR/run.json``: the run's name, config and every Flower run that worked on it
    (so `run status RUN_ID --runs-dir DIR` finds the folder without federation.json)."""

    run_name: str
    config: RunConfig
    flower_runs: tuple[FlowerRunEntry, ...] = field(default_factory=tuple)

    @property
    def latest_run_id(self) -> int:
        return self.flower_runs[-1].run_id if self.flower_runs else 0

    @property
    def run_ids(self) -> list[int]:
        return [e.run_id for e in self.flower_runs]

    def with_run(self, entry: FlowerRunEntry) -> RunRecord:
        return replace(self, flower_runs=(*self.flower_runs, entry))

    def to_record(self) -> dict[str, Any]:
        return {"format": RUN_RECORD_FORMAT, "run_name": self.run_name,
                "config": self.config.to_flat(),
                "flower_runs": [{"run_id": e.run_id, "started": e.started,
                                 "after_round": e.after_round} for e in self.flower_runs]}

    @classmethod
    def from_record(cls, raw: Any, *, source: str) -> RunRecord:
        def bad(what: str, got: str) -> ConfigError:
            return ConfigError(source, [FieldError(what, f"a {RUN_RECORD_FORMAT} record "
                                                   f"({what})", got, "restore the file "
                                                   "written by `fedpacs run start`")])

        if not isinstance(raw, dict) or raw.get("format") != RUN_RECORD_FORMAT:
            raise bad("format", repr(raw.get("format") if isinstance(raw, dict) else raw))
        entries = raw.get("flower_runs")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("run_id"), int) for e in entries):
            raise bad("flower_runs", repr(entries)[:200])
        if not isinstance(raw.get("config"), dict) or not isinstance(raw.get("run_name"), str):
            raise bad("config/run_name", "other types")
        cfg = RunConfig.from_flat(raw["config"], source=f"{source}: config", check=False)
        return cls(str(raw["run_name"]), cfg, tuple(
            FlowerRunEntry(int(e["run_id"]), float(e.get("started", 0.0)),
                           int(e.get("after_round", -1))) for e in entries))


def read_run_record(run_dir: Path) -> RunRecord | None:
    """``RUN_DIR/run.json`` (None when the run has none: not started by `run start`)."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), [FieldError(
            RUN_RECORD, "the run's record as JSON", f"unreadable ({type(exc).__name__})",
            "restore the file written by `fedpacs run start`")]) from exc
    return RunRecord.from_record(raw, source=str(path))


def record_flower_run(run_dir: Path, cfg: RunConfig, run_id: int, *,
                      after_round: int = -1) -> RunRecord:
    """Add a Flower run to ``RUN_DIR/run.json`` (created at the run's start)."""
    record = read_run_record(run_dir) or RunRecord(cfg.run_name or run_dir.name, cfg)
    record = record.with_run(FlowerRunEntry(run_id, time.time(), after_round))
    write_json(run_dir / RUN_RECORD, record.to_record())
    return record


def find_run_dir(runs_dir: Path, run_id: int) -> Path:
    """The run directory under ``runs_dir`` whose run.json names Flower run ``run_id``."""
    for path in sorted(runs_dir.glob(f"*/{RUN_RECORD}")):
        record = read_run_record(path.parent)
        if record is not None and run_id in record.run_ids:
            return path.parent
    raise ConfigError(str(runs_dir), [FieldError(
        "run id", f"a run started with `fedpacs run start` under {runs_dir} (its run.json "
        "names its Flower run ids)", str(run_id),
        "use the id `fedpacs run start` or `run resume` printed, and the --runs-dir the "
        "SuperLink was started with")])


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class PreparedRun:
    app_dir: Path
    run_dir: Path
    config: RunConfig  # with run_dir, run_name and artifact_key set


@dataclass(frozen=True)
class StartedRun:
    run_id: int
    run_dir: Path


@dataclass(frozen=True)
class ResumedRun:
    run_id: int
    run_dir: Path
    after_round: int  # the last completed round it continues after
    rounds: int


def new_run_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"


def prepare_run(cfg: RunConfig, *, runs_dir: Path, apps_dir: Path,
                artifact_key: Path | None) -> PreparedRun:
    """Give ``cfg`` a run directory under ``runs_dir`` with its server-side settings
    (server.json, which the ServerApp finds by the run's name under the SuperLink's runs
    folder) and write its app under ``apps_dir``, unsigned. ``cfg`` is validated by the
    caller."""
    name = new_run_name()
    run_dir = runs_dir.absolute() / name
    cfg = replace(cfg, run_dir=str(run_dir), run_name=name,
                  artifact_key=cfg.artifact_key or (str(artifact_key.absolute())
                                                    if artifact_key else ""))
    write_server_side(run_dir, cfg.server_side())
    return PreparedRun(write_app(apps_dir / name, cfg), run_dir, cfg)


def start_run(*, control: Control, cfg: RunConfig, runs_dir: Path, apps_dir: Path,
              app_key: Path, artifact_key: Path | None) -> StartedRun:
    """Validate ``cfg``, prepare its run, sign the app with ``app_key`` (sites run only
    apps signed by a key they trust), submit it and record the Flower run id in the run's
    run.json."""
    errs = cfg.validate()
    if not errs and cfg.init_model:  # its layers must fit the run's network
        from fedpacs.common.transfer import init_model_problems

        errs = init_model_problems(cfg.init_model, cfg.task_config(),
                                   registry_root=Path(cfg.init_registry)
                                   if cfg.init_registry else None)
    if errs:
        raise ConfigError("run config", errs)
    prep = prepare_run(cfg, runs_dir=runs_dir, apps_dir=apps_dir, artifact_key=artifact_key)
    sign_app(prep.app_dir, app_key)
    run_id = control.submit(prep.app_dir)
    record_flower_run(prep.run_dir, prep.config, run_id)
    return StartedRun(run_id, prep.run_dir)


def resume_run(*, control: Control, run_dir: Path, apps_dir: Path, app_key: Path,
               runs_dir: Path | None = None) -> ResumedRun:
    """Continue a stopped run after its last completed round: ``load_resume`` checks the
    checkpoint, the run's latest Flower run must have finished, ``mark_resume`` tells the
    next ServerApp (server.json) where to continue; then the app for the run's own config
    (same run name and folder) is written, signed, submitted and recorded."""
    from fedpacs.server.resume import load_resume, mark_resume

    run_dir = run_dir.resolve()
    resume = load_resume(run_dir)
    cfg = resume.config
    errs: list[FieldError] = []
    if cfg.run_name != run_dir.name:
        errs.append(FieldError("run_name", f"the run folder's name {run_dir.name!r} (the "
                               "ServerApp finds server.json by it)", repr(cfg.run_name),
                               "resume the run in the folder it was started in"))
    if runs_dir is not None and run_dir.parent != runs_dir.resolve():
        errs.append(FieldError(RUNS_DIR_FLAG, f"the folder holding {run_dir.name} (the "
                               "SuperLink's runs folder)", str(runs_dir),
                               f"pass --runs-dir {run_dir.parent}, or the run folder under "
                               "the SuperLink's runs folder"))
    if not (run_dir / SERVER_SIDE_FILE).is_file():
        errs.append(FieldError(SERVER_SIDE_FILE, f"the run's server-side settings in "
                               f"{run_dir}", "no such file",
                               "resume a run started with `fedpacs run start`"))
    record = read_run_record(run_dir)
    if record is not None and record.flower_runs:
        last = control.flower_run(record.latest_run_id)
        if last.active:
            errs.append(FieldError("run", "a run whose latest Flower run has finished",
                                   f"Flower run {last.run_id} is {last.status}",
                                   f"stop it first: `fedpacs run stop {last.run_id}`"))
    if errs:
        raise ConfigError(str(run_dir), errs)
    mark_resume(run_dir, resume)
    app = write_app(apps_dir / f"{run_dir.name}-resume-{resume.round}", cfg)
    sign_app(app, app_key)
    before = read_status(run_dir)
    # settled until its ServerApp reports (a resumed run that fails at once is then seen)
    mark_state(run_dir, "resuming", f"resuming after round {resume.round}",
               rounds=cfg.rounds)
    try:
        run_id = control.submit(app)
    except (ProcessError, DeadlineError):
        if before:
            write_json(run_dir / STATUS_FILE, before)
        raise
    record_flower_run(run_dir, cfg, run_id, after_round=resume.round)
    return ResumedRun(run_id, run_dir, resume.round, cfg.rounds)


# ---------------------------------------------------------------------------- status
@dataclass(frozen=True)
class RunStatus:
    """A run as Flower (``status``, ``details``) and its ServerApp (``state``, ``round``
    of ``rounds``, ``error``) report it; ``reconciled``: status.json was corrected here."""

    run_id: int
    status: str
    details: str = ""
    run_dir: str = ""
    state: str = ""
    round: int | None = None
    rounds: int | None = None
    error: str = ""
    latest: dict[str, Any] | None = None
    reconciled: bool = False
    detail: str = ""  # a coded error's message (status.json's ``detail``), when there is one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def mark_state(run_dir: Path, state: str, error: str, *, rounds: int | None = None
               ) -> dict[str, Any]:
    """Write ``state`` and ``error`` into the run's status.json (its round and start kept;
    a missing file is created at round 0); returns what was written."""
    old = read_status(run_dir)
    new = {"round": 0, "rounds": rounds, "started": None, **old,
           "state": state, "error": error, "updated": time.time()}
    write_json(run_dir / STATUS_FILE, new)
    return new


def settle(run_dir: Path, flower: FlowerRun) -> tuple[str, str] | None:
    """(state, reason) to write when Flower says the run's ServerApp finished but
    status.json has not settled (running, or never written), or says failed where Flower
    says an operator stopped the run; None when nothing to do."""
    if not flower.finished:
        return None
    st = read_status(run_dir)
    sub = flower.status.split(":", 1)[-1]
    # a failed status.json Flower calls stopped: the operator's stop reached the ServerApp
    # as an error it did not know for a stop
    misread_stop = st.get("state") == "failed" and sub == "stopped"
    if st.get("state") in FINAL_STATES and not misread_stop:
        return None
    state = "interrupted" if sub == "stopped" else "failed"
    where = f"at round {st.get('round', 0)} of {st.get('rounds', '?')}" if st \
        else "before it wrote its status"
    why = f" ({flower.details})" if flower.details else ""
    said = f"; the ServerApp's last word: {st.get('error') or 'none'}" if misread_stop else ""
    return state, (f"ServerApp ended: Flower status {flower.status}{why} {where}{said}; "
                   f"resume with `fedpacs run resume {run_dir}`")


def run_status(*, control: Control, run_id: int, run_dir: Path | None) -> RunStatus:
    """Flower's status of the run plus fedpacs' round progress and latest metrics; a
    status.json left at running by a ServerApp that is gone is settled first (only for
    the run directory's latest Flower run: an earlier one of a resumed run says nothing
    about the run now)."""
    return status_of(control.flower_run(run_id), run_id=run_id, run_dir=run_dir)


def status_of(flower: FlowerRun, *, run_id: int, run_dir: Path | None) -> RunStatus:
    """:func:`run_status` for what Flower already said of the run (``flower``)."""
    if run_dir is None:
        return RunStatus(run_id, flower.status, flower.details)
    record = read_run_record(run_dir)
    latest = record is None or record.latest_run_id == run_id
    reconciled = False
    fix = settle(run_dir, flower) if latest else None
    if fix is not None:
        mark_state(run_dir, *fix, rounds=record.config.rounds if record else None)
        reconciled = True
    st = read_status(run_dir)
    rounds = read_rounds(run_dir)
    last = {k: rounds[-1].get(k) for k in ("heldout", "train", "evaluate")} if rounds else None
    return RunStatus(run_id, flower.status, flower.details, str(run_dir),
                     str(st.get("state", "")), _int(st.get("round")), _int(st.get("rounds")),
                     str(st.get("error", "") or ""), last, reconciled,
                     str(st.get("detail", "") or ""))


def mark_interrupted(run_dir: Path, reason: str) -> bool:
    """Settle a run whose ServerApp can no longer report (its SuperLink died, or the
    watch's deadline stopped it): status.json says ``interrupted`` with ``reason``, unless
    it already settled. Returns whether it was written."""
    if read_status(run_dir).get("state") in FINAL_STATES:
        return False
    record = read_run_record(run_dir)
    mark_state(run_dir, "interrupted", f"{reason}; resume with `fedpacs run resume "
               f"{run_dir}`", rounds=record.config.rounds if record else None)
    return True


# ---------------------------------------------------------------------------- commands
def _need(value: Path | None, flag: str) -> Path:
    if value is None:  # resolve_target checks it first; this names it if a caller did not
        raise ConfigError("run command", [FieldError(flag, "a path (with --control)",
                                                     "nothing", f"pass {flag}")])
    return value


def _federation(workdir: Path) -> Any:
    from fedpacs.server.coordinator.federation import Federation  # (it imports this module)

    return Federation.load(workdir)


def start(*, target: Path | ByAddress, cfg: RunConfig) -> StartedRun:
    """`fedpacs run start`: on the federation in ``target`` (a workdir, its sites checked
    too) or at a SuperLink given by address."""
    if isinstance(target, Path):
        run_id, run_dir = _federation(target).start_run(cfg)
        return StartedRun(run_id, run_dir)
    with Control.session(target.connection) as control:
        return start_run(control=control, cfg=cfg,
                         runs_dir=_need(target.runs_dir, RUNS_DIR_FLAG),
                         apps_dir=control.home / "apps",
                         app_key=_need(target.app_key, APP_KEY_FLAG),
                         artifact_key=_need(target.artifact_key, ARTIFACT_KEY_FLAG))


def status(*, target: Path | ByAddress, run_id: int) -> RunStatus:
    """`fedpacs run status`: Flower's and the ServerApp's view of a run, settled."""
    if isinstance(target, Path):
        fed = _federation(target)
        return run_status(control=fed.control, run_id=run_id, run_dir=fed.find_run_dir(run_id))
    runs_dir = _need(target.runs_dir, RUNS_DIR_FLAG)
    with Control.session(target.connection) as control:
        control.check_reachable()  # a SuperLink gone is named before anything else
        return run_status(control=control, run_id=run_id,
                          run_dir=find_run_dir(runs_dir, run_id))


def stop(*, target: Path | ByAddress, run_id: int) -> None:
    """`fedpacs run stop` (with --runs-dir, only a run started under that folder)."""
    if isinstance(target, Path):
        _federation(target).stop_run(run_id)
        return
    if target.runs_dir is not None:
        find_run_dir(target.runs_dir, run_id)
    with Control.session(target.connection) as control:
        control.stop(run_id)


def logs(*, target: Path | ByAddress, run_id: int) -> str:
    """`fedpacs run logs`: the ServerApp's log as the SuperLink keeps it (with --runs-dir,
    only of a run started under that folder)."""
    if isinstance(target, Path):
        return str(_federation(target).logs(run_id))
    if target.runs_dir is not None:
        find_run_dir(target.runs_dir, run_id)
    with Control.session(target.connection) as control:
        return control.logs(run_id)


def resume(*, target: Path | ByAddress, run_dir: Path) -> ResumedRun:
    """`fedpacs run resume RUN_DIR`: continue a stopped run after its last completed
    round."""
    if isinstance(target, Path):
        resumed: ResumedRun = _federation(target).resume_run(run_dir)
        return resumed
    with Control.session(target.connection) as control:
        return resume_run(control=control, run_dir=run_dir, apps_dir=control.home / "apps",
                          app_key=_need(target.app_key, APP_KEY_FLAG),
                          runs_dir=target.runs_dir)
