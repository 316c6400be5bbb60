"""The site's app gate: a SuperNode runs only ClientApps signed by a key the hospital trusts.

How Flower 1.41 runs code at a site: the SuperNode turns each message from the SuperLink
into a *task* whose kind the SuperLink decides (the run's primary task type: ``flwr-agentapp``
for a bundle with an ``agentapp`` component, else ``flwr-clientapp``); a task may create
further tasks of any kind (``flwr-model``, ``flwr-connector``, ...). The SuperExec acquires
pending tasks and starts, for each, the launcher named after its kind, by name on PATH
(``flwr.supercore.constant.TASK_TYPE_TO_COMMAND``). Flower's own SuperExec serves every kind,
and every launcher but ``flwr-clientapp`` would install and import a bundle (or act for one)
with no check of ours. So the site daemon puts three locks in front of that (1 and 2 each
stop an AgentApp on their own; 3 guards the ClientApps that do run):

1. The site's SuperExec (``flower-superexec`` in the gate folder, started by the daemon; the
   SuperNode runs with ``--isolation process`` and starts none itself) launches
   ``flwr-clientapp`` tasks only. A task of any other kind is acquired and finished as
   failed at once, nothing started, and the site log says why (:class:`SitePlugin`).
2. Every other launcher name, first on PATH, refuses the same way (:func:`refuse_main`).
3. ``flwr-clientapp``, first on PATH, checks the app bundle's signature
   (``fedpacs-app.sig.json``, Ed25519 over the SHA-256 of every file; see
   fedpacs.common.signing) against ``security.trusted_app_keys`` *before* installing or
   importing any of it (:func:`main`).

Flower's own ``--trusted-entities`` check accepts only apps the Flower platform verified:
the SuperLink keeps no verification for an uploaded bundle, so it cannot carry ours.
What this module relies on in Flower is pinned by tests/test_gate.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import (
    PullAppMessagesRequest,
    PushTaskOutputRequest,
)
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import Executor, LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedpacs.common.errors import AuthError, ExitCode
from fedpacs.common.signing import verify_fab

TRUST_ENV = "FEDPACS_TRUSTED_APP_KEYS"  # os.pathsep-separated public key files
UNSIGNED_ENV = "FEDPACS_ALLOW_UNSIGNED_APPS"  # "1": security.allow_unsigned_apps (development)
GATE_DIR_ENV = "FEDPACS_GATE_DIR"  # the gate folder, first on PATH
GATE_COMMAND = "flwr-clientapp"  # the launcher of the one task kind a site runs
SUPEREXEC_COMMAND = "flower-superexec"
# Every other launcher Flower 1.41's SuperExec may start (TASK_TYPE_TO_COMMAND; pinned).
REFUSED_COMMANDS = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-serverapp",
                    "flwr-simulation")


class AppRefused(AuthError):
    """An app bundle failed the site's signature check."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ 3. flwr-clientapp
def checked(install: Callable[..., Any], trusted: list[Path]) -> Callable[..., Any]:
    """``install`` (flwr's install_from_fab) behind the signature check."""
    def install_if_signed(fab: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(fab).hexdigest()[:12]
        try:
            signer = verify_fab(fab, trusted)
        except AuthError as err:
            _say(f"fedpacs app gate: REFUSED app {digest}: {err}")
            raise AppRefused(f"app {digest} refused by the site's app gate: {err}") from err
        _say(f"fedpacs app gate: app {digest} signed by trusted key {signer}")
        return install(fab, *args, **kwargs)
    return install_if_signed


def main() -> None:
    """``flwr-clientapp`` with the signature check in front of the app's installation."""
    from fedpacs.client import timing

    if timing.LAUNCH not in timing.marks():  # a cold launch: this process is the launcher
        timing.mark(timing.LAUNCH, timing.process_started())
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from fedpacs.common.flowertune import quick_object_pulls

    quick_object_pulls()
    trusted = [Path(p) for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    runtime.install_from_fab = checked(runtime.install_from_fab, trusted)
    flwr_clientapp()


# ------------------------------------------------------------------ refusing a task
def refusal_reason(kind: str) -> str:
    return (f"this site runs only ClientApps ({GATE_COMMAND}) signed by a key it trusts; "
            f"the coordinator asked it to run a {kind!r} task. Nothing of the app was "
            "installed or imported (site policy: fedpacs.client.gate)")


class TaskRuntime(Protocol):
    """The two Runtime API calls a refusal makes (RuntimeHttpClient, or a fake)."""

    def PullMessages(self, request: Any) -> Any: ...  # noqa: N802 (Flower's names)

    def PushTaskOutput(self, request: Any) -> Any: ...  # noqa: N802


def finish_refused(runtime: TaskRuntime, kind: str, reason: str) -> None:
    """Finish a claimed task as failed without running anything. An AgentApp task's
    message from the SuperLink is taken first, so that the SuperNode answers it with an
    error at once (it waits for a reply to every message before it takes the next)."""
    if kind == TaskType.AGENT_APP:
        runtime.PullMessages(PullAppMessagesRequest())
    runtime.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=reason))


def refuse_task(address: str, token: str, kind: str, reason: str, *, insecure: bool,
                root_certificates: str | None) -> bool:
    """:func:`finish_refused` over the SuperNode's Runtime API with the task's token: one
    try per call, each with the client's 30 s timeout. Returns False (said in the log)
    when the Runtime API could not be reached; the task then expires by Flower's rules."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=kind),
                      RuntimeTokenHttpInterceptor(token)])
    try:
        finish_refused(client, kind, reason)
    except httpx.HTTPError as err:
        _say(f"fedpacs site: could not finish the refused {kind!r} task: "
             f"{type(err).__name__}: {err}")
        return False
    finally:
        client.close()
    return True


Refuse = Callable[[str, str, str], object]  # (token, kind, reason)


# ------------------------------------------------------------------ 1. the SuperExec
class SitePlugin(AutoExecPlugin):
    """Flower's SuperExec plugin under the site's policy: only ClientApp tasks are
    launched. It acquires tasks of every kind, so that none is left pending (the SuperNode
    would wait for its reply for ever), and finishes all but ClientApp tasks as refused."""

    runs = frozenset({TaskType.CLIENT_APP})
    supported_task_types = frozenset(TaskType)

    def __init__(self, runtime_api_address: str, insecure: bool,
                 root_certificates_path: str | None, runtime_dependency_install: bool = False,
                 *, executor: Executor, refuse: Refuse | None = None) -> None:
        del runtime_dependency_install  # a site installs nothing at run time
        super().__init__(runtime_api_address=runtime_api_address, insecure=insecure,
                         root_certificates_path=root_certificates_path,
                         runtime_dependency_install=False, executor=executor)
        self.refuse: Refuse = refuse or self._refuse_over_runtime_api

    def _refuse_over_runtime_api(self, token: str, kind: str, reason: str) -> bool:
        return refuse_task(self.runtime_api_address, token, kind, reason,
                           insecure=self.insecure,
                           root_certificates=self.root_certificates_path)

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        if task.type in self.runs:
            return super().launch_task(token, task)
        reason = refusal_reason(task.type)
        _say(f"fedpacs site: REFUSED task {task.task_id} of run {task.run_id}: {reason}")
        self.refuse(token, task.type, reason)
        return LaunchResult.failed(f"refused by site policy: {task.type!r} tasks are not run")


def check_launchers(gate: Path, path: str) -> list[str]:
    """Problems with ``path``: each launcher written into ``gate`` must be the one found
    first on it (the SuperExec starts launchers by name)."""
    problems = []
    for script in sorted(p for p in gate.iterdir() if p.name != SUPEREXEC_COMMAND):
        found = shutil.which(script.name, path=path)
        if found is None or Path(found).resolve() != script.resolve():
            problems.append(f"{script.name}: expected {script} first on PATH, found {found}")
    return problems


def superexec_main(argv: Sequence[str] | None = None) -> None:
    """Flower's ``flower-superexec`` with :class:`SitePlugin`, local subprocesses only
    (another executor would start launchers outside this gate)."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    args = list(sys.argv[1:] if argv is None else argv)
    gate = os.environ.get(GATE_DIR_ENV, "")
    problems = [f"{a}: not allowed at a site (the gate needs local subprocesses)"
                for a in args if a.split("=")[0] in ("--executor", "--executor-config")]
    problems += (check_launchers(Path(gate), os.environ.get("PATH", "")) if gate
                 else [f"{GATE_DIR_ENV}: expected the gate folder, got nothing; start "
                       "sites with `fedpacs site start`"])
    if problems:
        _say("fedpacs site: SuperExec not started: " + "; ".join(problems))
        raise SystemExit(int(ExitCode.CONFIG))
    superexec.AutoExecPlugin = SitePlugin  # type: ignore[misc]  # pinned: tests/test_gate.py
    sys.argv = [sys.argv[0], *args]
    flower_superexec()


# ------------------------------------------------------------------ 2. other launchers
def refuse_main(kind: str, argv: Sequence[str] | None = None) -> None:
    """A launcher of a task kind the site does not run (``flwr-agentapp``, ...): say why,
    finish the task as refused, exit with ExitCode.POLICY. Nothing is installed or imported."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token

    reason = refusal_reason(kind)
    _say(f"fedpacs site: REFUSED {kind}: {reason}")
    parser = argparse.ArgumentParser(prog=kind, exit_on_error=False)
    parser.add_argument("--runtime-api-address", default="")
    add_args_flwr_app_common(parser, include_token_stdin=True)
    try:
        args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        token = try_obtain_flwr_app_token(args)
    except (argparse.ArgumentError, SystemExit) as err:
        _say(f"fedpacs site: {kind}: no task to finish ({err})")
        raise SystemExit(int(ExitCode.POLICY)) from None
    if args.runtime_api_address:
        refuse_task(args.runtime_api_address, token, kind, reason, insecure=args.insecure,
                    root_certificates=args.root_certificates)
    raise SystemExit(int(ExitCode.POLICY))


# ------------------------------------------------------------------ the gate folder
def _script(folder: Path, name: str, call: str, module: str = "fedpacs.client.gate") -> None:
    script = folder / name
    script.write_text(f"#!{sys.executable}\nfrom {module} import "
                      f"{call.split('(')[0]}\n\n{call}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install_gate(folder: Path, *, check_signatures: bool = True, warm: bool = False) -> Path:
    """Write the site's launchers into ``folder`` (to go first on PATH): the SuperExec, a
    refusing launcher for every kind but ClientApp, and ``flwr-clientapp``: at a warm site
    the relay to the warm parent (fedpacs.client.warm, whose child runs what follows);
    else with ``check_signatures`` the signature-checking one (without: Flower's own,
    allow_unsigned_apps)."""
    folder.mkdir(parents=True, exist_ok=True)
    _script(folder, SUPEREXEC_COMMAND, "superexec_main()")
    for name in REFUSED_COMMANDS:
        _script(folder, name, f"refuse_main({name!r})")
    if warm:
        _script(folder, GATE_COMMAND, "relay_main()", module="fedpacs.client.warm")
    elif check_signatures:
        _script(folder, GATE_COMMAND, "main()")
    else:
        (folder / GATE_COMMAND).unlink(missing_ok=True)
    return folder
