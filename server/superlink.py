"""The coordinator's SuperLink: Flower's ``flower-superlink`` with a longer SQLite lock wait
and, with ``--fleet-address HOST:PORT``, a second, public listener that serves the Fleet API
only.

SQLite lock wait: Flower 1.41 keeps the SuperLink's state in SQLite and gives a writer 5 s
to get the database lock (``PRAGMA busy_timeout``, ``flwr.supercore.constant.SQLITE_PRAGMAS``);
past that the request fails with HTTP 500 and the SuperNode does not send that reply again.
With 30 site daemons on a 2-core machine, writes queued behind each other for longer than
that, and four sites' replies of a round were lost (the round then waited for its
deadline). This launcher runs the same SuperLink with :data:`BUSY_TIMEOUT_MS`; every
other pragma is Flower's.

Fleet-only listener: Flower 1.41 serves the Fleet API (``/v1/fleet/``), the Control API
(``/v1/control/``, no authentication) and the ServerApp Runtime API (``/v1/runtime/``) from
one HTTPS port (``--host/--port``). Hospitals must reach the Fleet API and nothing else, so
with ``--fleet-address`` Flower's own listener stays on a loopback ``--host`` (the
coordinator's ``flwr`` CLI and the ServerApps use it) and a second uvicorn server, in the
same process and event loop, with the same TLS certificate and key, serves the same app
on the public address behind :class:`FleetOnly`, which answers 404 to every path outside
``/v1/fleet/``. The app's lifespan (state, SuperExec) runs once, with Flower's listener;
the public server runs with lifespan off. tests/test_gate.py pins every Flower internal
used here (where the pragmas are read, ``_run_superlink_http_api`` and what it passes to
uvicorn, ``create_app``, the Fleet routes' prefix, the Runtime address of the SuperExec).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from fedpacs.common.errors import ConfigError, DeadlineError, ExitCode, FieldError

BUSY_TIMEOUT_MS = 60_000  # Flower: 5000
FLEET_FLAG = "--fleet-address"
FLEET_PREFIX = "/v1/fleet/"
REFUSED_HEADER = b"x-fedpacs-refused"  # marks the filter's answers (tests tell them apart)
REFUSED_STATUS = 404
CONTROL_START_S = 120.0  # deadline for Flower's listener (and its lifespan) to start
SHUTDOWN_GRACE_S = 5  # seconds: the public server's graceful shutdown

log = logging.getLogger("fedpacs.superlink")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def pragmas(flower: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in flower)


# ---------------------------------------------------------------------------- addresses
@dataclass(frozen=True)
class ListenAddress:
    """A host (name or IP) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, field: str, example: str = "10.77.0.1:9092") -> ListenAddress:
    """``HOST:PORT`` (an IPv6 host in brackets) or ConfigError naming ``field``."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(field, [FieldError(
            field, "HOST:PORT with a port in 1-65535", repr(text), f"e.g. {field} {example}")])
    return ListenAddress(host, int(port))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_fleet_flag(argv: list[str]) -> tuple[list[str], ListenAddress | None]:
    """``argv`` without ``--fleet-address HOST:PORT`` (or ``--fleet-address=HOST:PORT``),
    and that address (None when not given); Flower parses the rest."""
    rest: list[str] = []
    found: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == FLEET_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(FLEET_FLAG, [FieldError(
                    FLEET_FLAG, "HOST:PORT after the flag", "nothing",
                    f"e.g. {FLEET_FLAG} 10.77.0.1:9092")])
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(FLEET_FLAG + "="):
            found.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise ConfigError(FLEET_FLAG, [FieldError(
            FLEET_FLAG, "one address", ", ".join(found), "give the flag once")])
    return rest, (parse_address(found[0], field=FLEET_FLAG) if found else None)


# ---------------------------------------------------------------------------- the filter
def is_fleet_path(path: str) -> bool:
    """True for a path under ``/v1/fleet/`` with no empty, ``.`` or ``..`` segment (ASGI
    paths are already percent-decoded, so ``%2e%2e`` arrives as ``..``)."""
    if not path.startswith(FLEET_PREFIX) or len(path) == len(FLEET_PREFIX):
        return False
    return all(seg not in ("", ".", "..") for seg in path[1:].split("/"))


class FleetOnly:
    """ASGI filter: HTTP requests for the Fleet API pass to ``app``; any other path is
    answered 404 (marked with :data:`REFUSED_HEADER`), a WebSocket is closed."""

    def __init__(self, app: Asgi) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_fleet_path(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            body = b"not served on the SuperLink's Fleet listener\n"
            await send({"type": "http.response.start", "status": REFUSED_STATUS, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()), (REFUSED_HEADER, b"fleet-only")]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        # "lifespan": never sent (the public server runs with lifespan off)


# ---------------------------------------------------------------------------- serving
def _uvicorn_server(config: Any) -> Any:
    """A uvicorn server that leaves the signals to :func:`serve_pair` (uvicorn's own
    handler would stop only the server that installed it last)."""
    import uvicorn

    class PairServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return PairServer(config)


async def serve_pair(control: Any, public: Any, sockets: list[Any], *,
                     start_timeout_s: float = CONTROL_START_S) -> None:
    """Run Flower's listener (``control``, with the app's lifespan) and, once it serves,
    the public one on ``sockets``; SIGINT/SIGTERM or either server ending stops both."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        control.should_exit = public.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    control_task = asyncio.create_task(control.serve())
    deadline = time.monotonic() + start_timeout_s
    while not control.started and not control_task.done():
        if time.monotonic() >= deadline:
            stop()
            await control_task
            raise DeadlineError(f"the SuperLink's own listener did not start within "
                                f"{start_timeout_s:.0f}s")
        await asyncio.sleep(0.05)
    if control_task.done():  # it never started: its error, or its exit, is the process's
        await control_task
        return
    public_task = asyncio.create_task(public.serve(sockets=sockets))
    public_task.add_done_callback(lambda _t: stop())
    try:
        await control_task
    finally:
        public.should_exit = True
        await asyncio.wait_for(public_task, timeout=2 * SHUTDOWN_GRACE_S + 1)


def flower_module() -> Any:
    """``flwr.superlink.cli.flower_superlink`` (the package attribute of that name is the
    function)."""
    return importlib.import_module("flwr.superlink.cli.flower_superlink")


def serve(lifespan_config: Any, *, fleet: ListenAddress) -> None:
    """Replaces Flower's ``_run_superlink_http_api``: the same app and uvicorn settings on
    Flower's (loopback) listener, plus the Fleet-only listener on ``fleet``."""
    import uvicorn
    from flwr.superlink.main import create_app

    fs = flower_module()
    errs = []
    if lifespan_config.certificates is None:
        errs.append(FieldError("--insecure", f"TLS (--ssl-certfile/--ssl-keyfile) with "
                               f"{FLEET_FLAG}", "--insecure", "give the SuperLink its TLS files"))
    if not is_loopback(str(lifespan_config.host)):
        errs.append(FieldError("--host", f"a loopback address with {FLEET_FLAG} (the "
                               "Control and Runtime APIs have no authentication)",
                               repr(lifespan_config.host), "pass --host 127.0.0.1"))
    if errs:
        raise ConfigError("fedpacs.server.superlink", errs)
    app = create_app(lifespan_config, fs.SuperLinkLifespan)
    tls = {"ssl_keyfile": lifespan_config.ssl_keyfile,
           "ssl_certfile": lifespan_config.ssl_certfile}
    control = uvicorn.Config(
        app=app, host=lifespan_config.host, port=lifespan_config.port, reload=False,
        access_log=True, log_config=fs.get_uvicorn_log_config(fs.console_handler.level),
        workers=1, **tls)
    public = uvicorn.Config(
        app=FleetOnly(app), host=fleet.host, port=fleet.port, reload=False, access_log=True,
        log_config=None, workers=1, lifespan="off", ws="none",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **tls)
    sock = public.bind_socket()  # a taken or foreign address fails here, before anything runs
    log.info("SuperLink Control, Runtime and Fleet API on https://%s:%s; Fleet API only on "
             "https://%s", lifespan_config.host, lifespan_config.port, fleet)
    asyncio.run(serve_pair(_uvicorn_server(control), _uvicorn_server(public), [sock]))


def main() -> None:
    from flwr.supercore import sql_mixin

    try:
        rest, fleet = split_fleet_flag(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(int(ExitCode.CONFIG)) from err
    sys.argv[1:] = rest
    sql_mixin.SQLITE_PRAGMAS = pragmas(sql_mixin.SQLITE_PRAGMAS)  # type: ignore[assignment]
    fs = flower_module()
    if fleet is not None:
        fs._run_superlink_http_api = functools.partial(serve, fleet=fleet)
    try:
        fs.flower_superlink()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(int(ExitCode.CONFIG)) from err


if __name__ == "__main__":
    main()
