"""The site's app gate (fedpacs.client.gate, fedpacs.client.daemon).

First what the gate relies on in the installed Flower, pinned: each of these fails loudly
when a Flower upgrade changes the task kinds, their launchers, how the SuperExec starts
them, the plugin it builds, the function the ClientApp gate patches, or how a refused
AgentApp task is answered. Then the gate's refusals, each as an attack: a task of any kind
but ClientApp is never launched, and every other launcher refuses."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import io
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import flwr.supercore.superexec.run_superexec as run_superexec_mod
import flwr.supernode.runtime.run_clientapp as clientapp_runtime
import pytest
from flwr.app import RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PushTaskOutputRequest
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, ExecutorType, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.superexec.executor import (
    ExecutionSpec,
    LaunchResult,
    LaunchResultStatus,
    SubprocessExecutor,
    get_executor,
    subprocess_executor,
)
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supernode import start_client_internal as supernode_main
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.servicer.runtime import runtime_handlers

from fedpacs.client import gate
from fedpacs.client.config import SiteConfig, load_site_config
from fedpacs.client.daemon import (
    DaemonOptions,
    gate_dir,
    gate_env,
    superexec_argv,
    supernode_argv,
)
from fedpacs.client.gate import (
    GATE_COMMAND,
    GATE_DIR_ENV,
    REFUSED_COMMANDS,
    SUPEREXEC_COMMAND,
    TRUST_ENV,
    UNSIGNED_ENV,
    AppRefused,
    SitePlugin,
    check_launchers,
    finish_refused,
    install_gate,
    refuse_main,
    superexec_main,
)
from fedpacs.client.warm import WARM_SOCKET_ENV
from fedpacs.common.errors import ConfigError, ExitCode
from fedpacs.common.signing import generate_signing_key
from fedpacs.deploy.demo import write_site_configs

ALL_KINDS = {"flwr-serverapp", "flwr-clientapp", "flwr-simulation", "flwr-agentapp",
             "flwr-model", "flwr-connector"}


# the CLI modules (their packages' attributes of those names are the functions)
superexec_cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")
clientapp_cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")


def _source_tree(fn: Any) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and ast.unparse(n.func) == name]


# ====================================================================== pinned Flower
def test_flower_task_kinds_and_launchers_are_the_ones_the_gate_covers() -> None:
    assert {k.value for k in TaskType} == ALL_KINDS
    # each kind's launcher is named after it, and the gate has one for each
    assert {k.value: c for k, c in TASK_TYPE_TO_COMMAND.items()} == {k: k for k in ALL_KINDS}
    assert set(TASK_TYPE_TO_COMMAND.values()) == {GATE_COMMAND, *REFUSED_COMMANDS}
    # and they are all of flwr's task launchers (console scripts), plus its SuperExec
    scripts = {ep.name for ep in importlib.metadata.distribution("flwr").entry_points
               if ep.group == "console_scripts"}
    assert {s for s in scripts if s.startswith("flwr-")} == ALL_KINDS
    assert SUPEREXEC_COMMAND in scripts


def test_flower_superexec_starts_each_launcher_by_bare_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """So the gate folder, first on PATH, decides which program runs."""
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen",
                        lambda args, **_kw: started.append(list(args)))
    executor = get_executor(ExecutorType.SUBPROCESS)
    assert isinstance(executor, SubprocessExecutor)
    # no task is acquired by FAB hash alone, whatever its kind
    assert executor.get_eligible_capacity(set(TaskType)) == (set(TaskType), set())
    for kind in TaskType:
        assert executor.launch(ExecutionSpec(
            task_type=kind, runtime_api_address="127.0.0.1:1", token="t", insecure=True,
            root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
            suppress_output=False, task_id=1)).status == LaunchResultStatus.ACCEPTED
    assert [a[0] for a in started] == [k.value for k in TaskType]


def test_flower_superexec_serves_every_kind_and_has_no_setting_to_narrow_it() -> None:
    """Why the site brings its own plugin: Flower's runs all six kinds, and run_superexec
    builds it from the module name the site's SuperExec replaces."""
    assert AutoExecPlugin.supported_task_types == frozenset(TaskType)
    assert run_superexec_mod.AutoExecPlugin is AutoExecPlugin
    built = _calls(_source_tree(run_superexec_mod.run_superexec), "AutoExecPlugin")
    assert len(built) == 1
    assert {k.arg for k in built[0].keywords} == {
        "runtime_api_address", "insecure", "root_certificates_path",
        "runtime_dependency_install", "executor"}
    options = {o for a in superexec_cli._parse_args()._actions for o in a.option_strings}
    assert not [o for o in options if "task" in o or "plugin-config" in o]
    assert {"--runtime-api-address", "--insecure", "--parent-pid", "--executor"} <= options


def test_supernode_starts_a_superexec_only_in_subprocess_isolation() -> None:
    tree = _source_tree(supernode_main.start_client_internal)
    popens = _calls(tree, "subprocess.Popen")
    guarded = [c for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test) == "isolation == ISOLATION_MODE_SUBPROCESS"
               for c in _calls(node, "subprocess.Popen")]
    assert len(popens) == 1 and guarded == popens
    args = flower_supernode._parse_args_run_supernode().parse_args(
        ["--isolation", "process", "--host", "127.0.0.1", "--port", "9094"])
    assert (args.isolation, args.host, args.port) == ("process", "127.0.0.1", 9094)


def test_supernode_makes_clientapp_or_agentapp_tasks_as_the_superlink_says() -> None:
    """The kind of a site's task comes from the run (the SuperLink), not from the site."""
    (create,) = _calls(_source_tree(supernode_main._pull_and_store_message),
                       "state.create_task")
    kind = next(k.value for k in create.keywords if k.arg == "task_type")
    assert ast.unparse(kind) == ("TaskType.AGENT_APP if run_info.primary_task_type == "
                                 "TaskType.AGENT_APP else TaskType.CLIENT_APP")


def test_flower_trusted_entities_cannot_carry_a_fedpacs_signature() -> None:
    """The SuperNode's own check wants a Flower-platform verification; the SuperLink keeps
    none for an uploaded bundle (``flwr run``), so the site checks its own signature."""
    src = inspect.getsource(supernode_main._pull_and_store_message)
    assert 'fab.verifications.get("valid_license", "")' in src
    from flwr.superlink.servicer.control import control_handlers

    start_run = inspect.getsource(control_handlers.start_run)
    assert "verification_dict: dict[str, str] = {}" in start_run
    assert "fab_file = request.fab.content" in start_run


def test_clientapp_installs_the_bundle_through_the_function_the_gate_patches() -> None:
    assert clientapp_cli.flwr_clientapp.__globals__["run_clientapp"] \
        is clientapp_runtime.run_clientapp
    assert clientapp_runtime.run_clientapp.__globals__ is vars(clientapp_runtime)
    src = ast.unparse(_source_tree(clientapp_runtime.run_clientapp))
    assert src.count("install_from_fab(") == 1
    assert src.index("install_from_fab(fab.content") < src.index("install_app_dependencies(") \
        < src.index("load_client_app_fn(run.fab_id")


def test_supernode_loop_sleeps_are_the_two_the_site_shortens() -> None:
    """fedpacs.client.supernode swaps the ``time`` the SuperNode loop module sees; the two
    fixed sleeps it shortens must be there, as module-level ``time.sleep`` calls."""
    from fedpacs.client import supernode as quick

    assert supernode_main.time is time  # the module global the launcher replaces
    loop = [ast.unparse(c) for c in _calls(_source_tree(supernode_main.start_client_internal),
                                           "time.sleep")]
    push = [ast.unparse(c) for c in _calls(_source_tree(supernode_main._push_messages),
                                           "time.sleep")]
    assert loop == [f"time.sleep({quick.FLOWER_IDLE_PULL_S})"]
    assert push and set(push) == {f"time.sleep({quick.FLOWER_REPLY_POLL_S})"}
    fast = quick.quick_time()
    t0 = time.monotonic()
    fast.sleep(quick.FLOWER_IDLE_PULL_S)
    fast.sleep(quick.FLOWER_REPLY_POLL_S)
    assert time.monotonic() - t0 < 1.0 and fast.time is time.time  # everything else as is


def test_object_pulls_retry_through_the_two_defaults_fedpacs_shortens() -> None:
    """fedpacs.common.flowertune lowers the backoff defaults of Flower's object pulls; the
    receivers (ClientApp, SuperNode, ServerApp grid) must not pass their own."""
    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.superlink.grid import http_grid

    from fedpacs.common import flowertune

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert {"initial_backoff", "backoff_cap"} <= set(params)
    for caller in (supernode_main._pull_and_store_message, http_grid.HttpGrid.pull_messages,
                   clientapp_runtime.pull_task_input):
        for call in _calls(_source_tree(caller), "pull_objects") + _calls(
                _source_tree(caller), "pull_and_inflate_object_from_tree"):
            assert not {k.arg for k in call.keywords} & {"initial_backoff", "backoff_cap"}
    saved = (iu.pull_objects.__defaults__, iu.pull_and_inflate_object_from_tree.__kwdefaults__)
    try:
        flowertune.quick_object_pulls()
        for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
            params = inspect.signature(fn).parameters
            assert params["initial_backoff"].default == flowertune.INITIAL_BACKOFF_S
            assert params["backoff_cap"].default == flowertune.BACKOFF_CAP_S
        unavailable = iter([True, True, False])

        def pull(_: str) -> bytes:
            if next(unavailable):
                raise iu.ObjectUnavailableError("x")
            return b"ok"

        t0 = time.monotonic()
        assert iu.pull_objects(["a"], pull) == {"a": b"ok"}
        assert time.monotonic() - t0 < 0.5  # two retries: Flower's defaults take ~3 s
    finally:
        iu.pull_objects.__defaults__, iu.pull_and_inflate_object_from_tree.__kwdefaults__ = saved


def test_superlink_sqlite_pragmas_are_read_where_the_coordinator_sets_them() -> None:
    """fedpacs.server.superlink replaces the busy_timeout pragma in sql_mixin's namespace;
    Flower must read the pragmas from there, at each new connection."""
    from flwr.supercore import sql_mixin

    from fedpacs.server import superlink

    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "5000"
    src = ast.unparse(_source_tree(sql_mixin._set_sqlite_pragmas))
    assert "for pragma, value in SQLITE_PRAGMAS:" in src
    assert sql_mixin._set_sqlite_pragmas.__globals__ is vars(sql_mixin)
    longer = dict(superlink.pragmas(sql_mixin.SQLITE_PRAGMAS))
    assert longer["busy_timeout"] == str(superlink.BUSY_TIMEOUT_MS)
    assert {k: v for k, v in longer.items() if k != "busy_timeout"} == {
        k: v for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"}


def test_superlink_http_api_is_the_one_function_fedpacs_replaces() -> None:
    """fedpacs.server.superlink swaps ``_run_superlink_http_api`` in flower_superlink's
    namespace (with --fleet-address); Flower must look it up there, once, after parsing
    sys.argv (from which --fleet-address was taken out)."""
    from fedpacs.server import superlink

    fs = superlink.flower_module()
    assert fs.flower_superlink.__globals__ is vars(fs)
    calls = _calls(_source_tree(fs.flower_superlink), "_run_superlink_http_api")
    assert [ast.unparse(c) for c in calls] == ["_run_superlink_http_api(lifespan_config=config)"]
    parse = ast.unparse(_source_tree(fs._parse_superlink_lifespan_config))
    assert "args = _parse_args_run_superlink().parse_args()" in parse
    assert "sys.argv[1:]" in parse
    # what Flower's version does, which fedpacs' serve() does for Flower's own listener
    run = _source_tree(fs._run_superlink_http_api)
    assert [ast.unparse(c) for c in _calls(run, "create_app")] == [
        "create_app(lifespan_config, SuperLinkLifespan)"]
    (uv,) = _calls(run, "uvicorn.run")
    assert {k.arg: ast.unparse(k.value) for k in uv.keywords} == {
        "app": "fastapi_app", "host": "lifespan_config.host", "port": "lifespan_config.port",
        "reload": "False", "access_log": "True",
        "log_config": "get_uvicorn_log_config(console_handler.level)",
        "ssl_keyfile": "lifespan_config.ssl_keyfile",
        "ssl_certfile": "lifespan_config.ssl_certfile", "workers": "1"}
    assert callable(fs.get_uvicorn_log_config) and hasattr(fs.console_handler, "level")


def test_superlink_app_owns_its_lifespan_and_its_superexec_dials_the_own_listener() -> None:
    """The public listener runs the same app with lifespan off: the lifespan (state,
    gRPC compatibility servers, the SuperExec) must be the FastAPI app's, run by Flower's
    listener; the SuperExec (hence every ServerApp) reaches the Runtime API on that
    listener's --host/--port (loopback), never on the public one."""
    from flwr.superlink import main as superlink_main

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    create = ast.unparse(_source_tree(superlink_main.create_app))
    assert "lifespan=lifespan" in create and "superlink_lifespan.startup()" in create
    assert list(inspect.signature(superlink_main.create_app).parameters) == [
        "config", "superlink_lifespan_class"]
    superexec = ast.unparse(_source_tree(fs.SuperLinkLifespan._start_superexec_if_needed))
    assert "runtime_host = f'[{config.host}]' if ':' in config.host else config.host" \
        in superexec
    assert "runtime_address = resolve_bind_address(f'{runtime_host}:{config.port}')" \
        in superexec


def test_fleet_api_lives_under_the_prefix_the_public_listener_lets_through() -> None:
    from flwr.superlink.routers.fleet.router import router as fleet_router
    from flwr.supernode import fleet_http_client

    from fedpacs.server.superlink import FLEET_PREFIX, is_fleet_path

    assert fleet_router.prefix + "/" == FLEET_PREFIX
    assert fleet_router.routes and all(is_fleet_path(r.path)  # type: ignore[attr-defined]
                                       for r in fleet_router.routes)
    dialed = re.findall(r'path="([^"]+)"', inspect.getsource(fleet_http_client))
    assert dialed and all(is_fleet_path(p) for p in dialed)  # every SuperNode request


def test_uvicorn_lets_fedpacs_serve_two_listeners_in_one_loop() -> None:
    import uvicorn

    serve = ast.unparse(_source_tree(uvicorn.Server.serve))
    assert "with self.capture_signals():" in serve  # replaced by a no-op in serve_pair
    assert "sockets" in inspect.signature(uvicorn.Server.serve).parameters
    assert callable(uvicorn.Config.bind_socket)
    assert {"lifespan", "ws", "timeout_graceful_shutdown"} <= set(
        inspect.signature(uvicorn.Config).parameters)


def test_flwr_cli_reports_an_unreachable_superlink_in_the_words_fedpacs_reads() -> None:
    """``flwr ... --format json`` exits 0 with success false when it cannot connect."""
    from flwr.cli import ls, utils

    from fedpacs.server.coordinator.control import UNAVAILABLE

    assert utils.SUPERLINK_UNAVAILABLE_MESSAGE.startswith(UNAVAILABLE)
    to_json = ast.unparse(_source_tree(ls._to_json))
    assert "'status': row.status_text" in to_json and "'status-details': row.details" \
        in to_json


def test_superexec_task_poll_interval_is_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpacs.common.procs import TASK_POLL_ENV, TASK_POLL_S, child_env

    monkeypatch.delenv(TASK_POLL_ENV, raising=False)
    monkeypatch.setenv(TASK_POLL_ENV, child_env()[TASK_POLL_ENV])  # every Flower process's
    assert run_superexec_mod._get_task_poll_interval() == TASK_POLL_S


def test_clientapp_loads_an_already_imported_app_module_as_it_is() -> None:
    """A warm site's child finds fedpacs.client.app imported by its parent: Flower's
    loader takes it from sys.modules (no re-import, no reload)."""
    from flwr.supercore import object_ref

    src = ast.unparse(_source_tree(object_ref.load_app))
    assert "if module_str not in sys.modules:" in src and "reload" not in src


def test_a_failed_agentapp_task_whose_message_was_taken_is_answered_with_an_error() -> None:
    """Pinned with Flower's own Runtime handlers: what :func:`finish_refused` does keeps a
    refused AgentApp task from stalling the SuperNode (it waits for each reply)."""
    def one_task(kind: TaskType) -> tuple[Any, Task]:
        state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
        state.set_node_id(7)
        msg = make_message(Metadata(
            run_id=5, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="",
            group_id="", created_at=time.time(), ttl=3600, message_type="query"), RecordDict())
        supernode_main._insert_message(msg, state, state.object_store)
        task_id = state.create_task(task_type=kind, run_id=5, fab_hash="a" * 64)
        assert task_id is not None
        token = state.claim_task(task_id)
        assert token is not None
        task = state.get_task_by_token(token)
        assert task is not None
        return state, task

    class Handlers:  # the Runtime API calls, straight into Flower's handlers
        def __init__(self, state: Any, task: Task) -> None:
            self.state, self.task = state, task

        def PullMessages(self, request: Any) -> Any:  # noqa: N802
            return runtime_handlers.pull_messages(request, self.state, self.task)

        def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802
            return runtime_handlers.push_task_output(request, self.state, self.task)

    state, task = one_task(TaskType.AGENT_APP)
    finish_refused(Handlers(state, task), task.type, "refused")
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error()
    (done,) = state.get_tasks(task_ids=[task.task_id])
    assert (done.status.sub_status, done.status.details) == (SubStatus.FAILED, "refused")


# ====================================================================== the refusals
class FakeExecutor:
    def __init__(self) -> None:
        self.launched: list[ExecutionSpec] = []

    def get_eligible_capacity(self, supported: set[TaskType], **_kw: Any
                              ) -> tuple[set[TaskType], set[str]]:
        return supported, set()

    def wait_for_capacity(self, *_a: Any, **_kw: Any) -> None:
        pass

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        self.launched.append(spec)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        pass

    def close(self) -> None:
        pass


def _plugin() -> tuple[SitePlugin, FakeExecutor, list[tuple[str, str, str]]]:
    executor, refused = FakeExecutor(), []
    plugin = SitePlugin(runtime_api_address="127.0.0.1:9094", insecure=True,
                        root_certificates_path=None, runtime_dependency_install=True,
                        executor=executor, refuse=lambda *a: refused.append(a))
    return plugin, executor, refused


def test_site_superexec_launches_clientapps_only(capsys: pytest.CaptureFixture[str]) -> None:
    plugin, executor, refused = _plugin()
    # it takes every kind off the SuperNode's queue, so none is left waiting
    assert set(plugin.supported_task_types) == set(TaskType)
    result = plugin.launch_task("tok-c", Task(task_id=1, run_id=9, type="flwr-clientapp"))
    assert result.status == LaunchResultStatus.ACCEPTED and not refused
    (spec,) = executor.launched
    assert (spec.task_type, spec.token) == (TaskType.CLIENT_APP, "tok-c")
    assert spec.runtime_dependency_install is False  # a site installs nothing at run time
    for i, kind in enumerate(sorted(ALL_KINDS - {"flwr-clientapp"}), start=2):
        result = plugin.launch_task(f"tok-{i}", Task(task_id=i, run_id=9, type=kind))
        assert result.status == LaunchResultStatus.FAILED and kind in str(result.message)
    assert len(executor.launched) == 1  # nothing else was started
    assert [(t, k) for t, k, _ in refused] == [
        (f"tok-{i}", k) for i, k in enumerate(sorted(ALL_KINDS - {"flwr-clientapp"}), 2)]
    err = capsys.readouterr().err
    assert err.count("REFUSED task") == 5 and "'flwr-agentapp' task" in err


def test_a_refused_task_is_finished_as_failed_and_only_an_agentapp_message_is_taken() -> None:
    calls: list[tuple[str, Any]] = []

    class Runtime:
        def PullMessages(self, request: Any) -> Any:  # noqa: N802
            calls.append(("pull", request))

        def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802
            calls.append(("output", request))

    finish_refused(Runtime(), "flwr-agentapp", "why")
    assert [c for c, _ in calls] == ["pull", "output"]
    assert calls[0][1] == PullAppMessagesRequest()
    assert calls[1][1] == PushTaskOutputRequest(sub_status=SubStatus.FAILED, details="why")
    calls.clear()
    finish_refused(Runtime(), "flwr-model", "why")  # its run's messages are not its own
    assert [c for c, _ in calls] == ["output"]


def test_other_launchers_refuse_and_finish_the_task(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    finished: list[tuple[Any, ...]] = []
    monkeypatch.setattr(gate, "refuse_task", lambda *a, **kw: finished.append((*a, kw)))
    for kind in REFUSED_COMMANDS:
        with pytest.raises(SystemExit) as exc:
            refuse_main(kind, ["--runtime-api-address", "127.0.0.1:9094", "--token", "tk",
                               "--insecure", "--parent-pid", "1", "--unknown-new-flag"])
        assert exc.value.code == ExitCode.POLICY
    assert [(a[0], a[1], a[2]) for a in finished] == [
        ("127.0.0.1:9094", "tk", k) for k in REFUSED_COMMANDS]
    assert finished[0][4] == {"insecure": True, "root_certificates": None}
    with pytest.raises(SystemExit) as exc:  # unreadable arguments: still refused
        refuse_main("flwr-agentapp", ["--what"])
    assert exc.value.code == ExitCode.POLICY and len(finished) == len(REFUSED_COMMANDS)
    assert capsys.readouterr().err.count("REFUSED flwr-") == len(REFUSED_COMMANDS) + 1


def test_gate_folder_holds_every_launcher_and_must_come_first(tmp_path: Path) -> None:
    folder = install_gate(tmp_path / "gate")
    names = {p.name for p in folder.iterdir()}
    assert names == {SUPEREXEC_COMMAND, GATE_COMMAND, *REFUSED_COMMANDS}
    assert all(os.access(p, os.X_OK) for p in folder.iterdir())
    venv_bin = str(Path(sys.executable).parent)  # Flower's own launchers live here
    assert check_launchers(folder, f"{folder}{os.pathsep}{venv_bin}") == []
    problems = check_launchers(folder, f"{venv_bin}{os.pathsep}{folder}")
    assert len(problems) == 1 + len(REFUSED_COMMANDS)
    # allow_unsigned_apps: Flower's own flwr-clientapp, and a stale gate one is removed
    install_gate(folder, check_signatures=False)
    assert {p.name for p in folder.iterdir()} == {SUPEREXEC_COMMAND, *REFUSED_COMMANDS}


def test_site_superexec_will_not_start_outside_the_gate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder = install_gate(tmp_path / "gate")
    monkeypatch.setattr(run_superexec_mod, "AutoExecPlugin", AutoExecPlugin)  # restored
    ran: list[type] = []
    monkeypatch.setattr(superexec_cli, "flower_superexec",
                        lambda: ran.append(run_superexec_mod.AutoExecPlugin))
    argv = ["--runtime-api-address", "127.0.0.1:9094", "--insecure"]
    for env, extra in (({}, []),  # no gate folder
                       ({GATE_DIR_ENV: str(folder), "PATH": os.environ["PATH"]}, []),
                       ({GATE_DIR_ENV: str(folder), "PATH": str(folder)},
                        ["--executor", "kubernetes"])):
        monkeypatch.delenv(GATE_DIR_ENV, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as exc:
            superexec_main([*argv, *extra])
        assert exc.value.code == ExitCode.CONFIG and not ran
    assert capsys.readouterr().err.count("SuperExec not started") == 3
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "argv", ["flower-superexec"])
    superexec_main(argv)
    assert ran == [SitePlugin] and sys.argv == ["flower-superexec", *argv]


def test_refusing_launcher_script_runs_standalone(tmp_path: Path) -> None:
    """The real script, as Flower's SuperExec would start it (no Runtime API to reach)."""
    folder = install_gate(tmp_path / "gate")
    res = subprocess.run([str(folder / "flwr-agentapp"), "--runtime-api-address",
                          "127.0.0.1:9", "--token", "ab", "--insecure"],
                         capture_output=True, text=True, timeout=120,
                         env=os.environ | {"FLWR_HOME": str(tmp_path / "home")})
    assert res.returncode == ExitCode.POLICY
    assert "REFUSED flwr-agentapp" in res.stderr
    assert "could not finish the refused 'flwr-agentapp' task" in res.stderr


def test_clientapp_gate_patches_the_installer_and_refuses_an_unsigned_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[bytes] = []
    monkeypatch.setattr(clientapp_runtime, "install_from_fab",
                        lambda fab, **_kw: installed.append(fab))
    monkeypatch.setattr(clientapp_cli, "flwr_clientapp", lambda: None)
    pub = generate_signing_key(tmp_path / "k" / "signing.key")
    monkeypatch.setenv(TRUST_ENV, str(pub))
    gate.main()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", "[project]\nname = 'evil'\n")
        z.writestr("evil.py", "open('/tmp/pwned', 'w')\n")
    with pytest.raises(AppRefused, match="not signed"):
        clientapp_runtime.install_from_fab(buf.getvalue(), skip_prompt=True)
    assert installed == []


# ====================================================================== the daemon
@pytest.fixture()
def site(tmp_path: Path, data_dir: Path) -> SiteConfig:
    pub = generate_signing_key(tmp_path / "pki" / "signing.key")
    (path,) = write_site_configs(
        tmp_path / "sites", task="breastmnist", fmt="medmnist", names=["site-a"], threads=1,
        seed=0, data=data_dir / "medmnist_breast" / "breastmnist.npz", trusted_keys=[pub])
    return load_site_config(path)


def test_daemon_runs_the_supernode_without_a_superexec_and_starts_the_sites(
        tmp_path: Path) -> None:
    ca, key = tmp_path / "ca.pem", tmp_path / "site.key"
    ca.write_text("x")
    key.write_text("x")
    opts = DaemonOptions(config=None, superlink="127.0.0.1:9092", root_certificates=ca,
                         auth_key=key, runtime_port=9555)
    argv = supernode_argv(opts, tmp_path / "site.toml")
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[1:3] == ["-m", "fedpacs.client.supernode"]
    assert flower_supernode._parse_args_run_supernode().parse_args(argv[3:]).isolation \
        == "process"
    assert superexec_argv(opts, tmp_path, 4242) == [
        str(gate_dir(tmp_path) / SUPEREXEC_COMMAND), "--runtime-api-address",
        "127.0.0.1:9555", "--insecure", "--parent-pid", "4242"]


def test_gate_env_in_both_modes(site: SiteConfig, tmp_path: Path) -> None:
    env = gate_env(site, tmp_path / "state", "/usr/bin")
    folder = gate_dir(tmp_path / "state")
    assert env["PATH"] == f"{folder}{os.pathsep}/usr/bin" and env[GATE_DIR_ENV] == str(folder)
    assert env[TRUST_ENV] == str(site.security.trusted_app_keys[0])
    assert (folder / GATE_COMMAND).is_file() and UNSIGNED_ENV not in env
    # warm (the default): the launcher is the relay, and the child runs the checked one
    assert "relay_main()" in (folder / GATE_COMMAND).read_text()
    assert env[WARM_SOCKET_ENV] == str(tmp_path / "state" / "warm" / "warm.sock")
    unsigned = replace(site, security=replace(site.security, allow_unsigned_apps=True))
    env = gate_env(unsigned, tmp_path / "state", "/usr/bin")
    assert TRUST_ENV not in env and env[GATE_DIR_ENV] == str(folder) and env[UNSIGNED_ENV] == "1"
    cold = replace(unsigned, compute=replace(site.compute, warm=False))
    env = gate_env(cold, tmp_path / "state", "/usr/bin")
    assert WARM_SOCKET_ENV not in env
    assert not (folder / GATE_COMMAND).exists() and (folder / "flwr-agentapp").is_file()
    untrusting = replace(site, security=replace(site.security, trusted_app_keys=()))
    with pytest.raises(ConfigError, match="security.trusted_app_keys"):
        gate_env(untrusting, tmp_path / "state", "/usr/bin")


def test_a_reply_left_after_a_push_cycle_is_pushed_without_waiting_for_a_message() -> None:
    """Flower's SuperNode loop pushes only right after a pull found a message. A reply
    stored after that cycle (the next run's, when a stopped run's late reply took the
    cycle) must be pushed on the next idle pull; fedpacs.client.supernode patches the pull
    to report it. Run on Flower's real loop functions and in-memory NodeState."""
    import flwr.supernode.start_client_internal as internal

    from fedpacs.client import supernode as quick

    assert "state" in inspect.signature(internal._pull_and_store_message).parameters
    loop = ast.unparse(_source_tree(internal.start_client_internal))
    assert "run_id = _pull_and_store_message(" in loop and "if run_id is None:" in loop
    state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
    assert quick.pending_reply_run(state) is None
    calls: list[dict[str, object]] = []

    class Fake:
        _pull_and_store_message = staticmethod(lambda **kw: calls.append(kw))

    quick.push_pending_replies(Fake)
    assert Fake._pull_and_store_message(state=state) is None  # nothing pulled, none waiting
    reply = make_message(Metadata(  # the ClientApp's reply to message m-1 of run 42
        run_id=42, message_id="r-1", src_node_id=7, dst_node_id=0, reply_to_message_id="m-1",
        group_id="", created_at=time.time(), ttl=3600, message_type="train"), RecordDict())
    state.store_message(reply)
    assert Fake._pull_and_store_message(state=state) == 42  # the loop pushes it now
    # found by peeking, not taken: Flower's push still gets it
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == \
        [reply.metadata.message_id]
    assert quick.pending_reply_run(state) is None
    assert len(calls) == 2  # each patched pull asked Flower's pull first
