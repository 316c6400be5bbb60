"""A warm site: one parent process keeps the imports, the model's kernels and the decoded
data set ready, and forks a fresh process for every message.

Flower 1.41 starts a new ``flwr-clientapp`` process for every message (train, evaluate,
each SecAgg+ stage): interpreter, flwr, torch, MONAI and fedpacs imports, then the site's
whole data set read and decoded again. At a warm site the ``flwr-clientapp`` launcher in
the gate folder is a relay (:func:`relay_main`, a few standard-library imports): it hands
its arguments and its stdin/stdout/stderr over a Unix socket to the site's warm parent
(:func:`serve`), which forks; the child runs exactly what the cold launcher runs — the
signature check before the bundle is installed or imported (fedpacs.client.gate.main),
then Flower's ClientApp runtime — and exits. So:

* every message still runs in a process of its own, which ends with the message: no state
  of one message (nor of one run) reaches the next except through Flower's Context;
* the app bundle is checked in every child before anything of it is installed or
  imported; the parent never loads a bundle;
* the parent holds the site's data (fedpacs.client.datacache) and reloads it before it
  forks when the site config or a data file has changed; children share it copy-on-write.

The parent keeps torch single-threaded itself: GNU OpenMP hangs a forked child whose parent
had started a thread pool, and each child sets the site's own thread count.
When the parent cannot be reached, the relay runs the message cold, in its own process,
as the gate always did; the site daemon restarts a parent that died.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WARM_SOCKET_ENV = "FEDPACS_WARM_SOCKET"  # the warm parent's Unix socket, set by the daemon
SOCKET_NAME = "warm.sock"
MAX_REQUEST = 64 * 1024  # one launcher's argument list, as JSON
STDIO = 3  # stdin, stdout, stderr travel with the request
POLL_S = 0.2  # how often the parent looks for finished children between requests

log = logging.getLogger("fedpacs.site.warm")


# ------------------------------------------------------------------ the relay
def relay_main(argv: list[str] | None = None) -> None:
    """``flwr-clientapp`` at a warm site: have the warm parent run this launch, wait for
    its exit code and exit with it; run cold here when no warm parent answers."""
    launched = time.time()
    args = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(WARM_SOCKET_ENV, "")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError as err:
        print(f"fedpacs site: warm parent not reachable at {path or '(unset)'} ({err}); "
              "running this message cold", file=sys.stderr, flush=True)
        _run_cold(args)
        return
    request = json.dumps({"argv": args, "launched": launched}).encode()
    socket.send_fds(sock, [request], [0, 1, 2])

    def forward(signum: int, _frame: object) -> None:
        try:
            sock.sendall(f"signal {signum}\n".encode())
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            break
        reply += chunk
    try:
        code = int(reply.decode().split()[-1])
    except (ValueError, IndexError):
        print("fedpacs site: the warm parent went away during this message", file=sys.stderr,
              flush=True)
        code = 1
    raise SystemExit(code)


def _run_cold(argv: list[str]) -> None:
    sys.argv = [sys.argv[0], *argv]
    run_launcher()


def run_launcher() -> None:
    """What a ClientApp launch runs, warm or cold: the signature-checked launcher, or
    Flower's own where the site allows unsigned apps (fedpacs.client.gate)."""
    from fedpacs.client import gate

    if os.environ.get(gate.TRUST_ENV, ""):
        gate.main()  # (shortens Flower's object-pull retries itself)
        return
    if os.environ.get(gate.UNSIGNED_ENV, "") != "1":
        print("fedpacs site: no trusted app keys and unsigned apps not allowed: refused",
              file=sys.stderr, flush=True)
        raise SystemExit(int(gate.ExitCode.POLICY))  # (never reached from the daemon)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from fedpacs.common.flowertune import quick_object_pulls

    quick_object_pulls()
    flwr_clientapp()


# ------------------------------------------------------------------ the warm parent
@dataclass
class Launch:
    """One forked child and the relay that waits for it."""

    pid: int
    conn: socket.socket
    started: float = field(default_factory=time.monotonic)


def warm_up(config: str | None) -> dict[str, Any]:
    """Import what every message needs and load the site's data for its own task; run one
    training step single-threaded so the kernels are ready. Returns what was done."""
    import torch

    global _default_threads
    _default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parent never starts an OpenMP pool (see module doc)
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import fedpacs.client.app  # noqa: F401
    import fedpacs.client.secure  # noqa: F401
    import fedpacs.client.trainer  # noqa: F401
    from fedpacs.client import datacache
    from fedpacs.client.config import load_site_config
    from fedpacs.common.engine import TrainParams, train
    from fedpacs.common.models import build_model
    from fedpacs.common.tasks import get_task

    site = load_site_config(config)
    task = site.custom_task or get_task(site.task)
    t0 = time.monotonic()
    data = datacache.site_data(site, task)
    loaded = time.monotonic() - t0
    if len(data.train):  # one real step: DataLoader, loss, optimizer (its first use
        # imports torch._dynamo, ~2 s) and the kernels of the site's network
        from torch.utils.data import Subset

        train(build_model(task), Subset(data.train, range(min(2, len(data.train)))),
              task=task, device=torch.device("cpu"), seed=0,
              params=TrainParams(epochs=1, batch_size=2, lr=1e-3, proximal_mu=0.0))
    return {"site": site.name, "train": len(data.train), "val": len(data.val),
            "load_s": round(loaded, 2)}


def refresh(config: str | None) -> bool:
    """Reload the site's data in the parent when its config or files changed since the
    last load (before a fork, so the child finds it warm). True when it reloaded."""
    from fedpacs.client import datacache
    from fedpacs.client.config import load_site_config
    from fedpacs.common.errors import FedpacsError
    from fedpacs.common.tasks import get_task

    try:
        site = load_site_config(config)
        task = site.custom_task or get_task(site.task)
        if datacache.is_warm(site, task):
            return False
        datacache.site_data(site, task)
    except FedpacsError as err:  # the child meets the same error and reports it, coded
        log.warning("warm parent: the site's data could not be loaded: %s", err)
        return False
    return True


def _child(request: dict[str, Any], fds: list[int], closing: list[socket.socket]) -> None:
    """In the forked child: take the relay's stdio and run the launcher; never returns."""
    code = 1
    try:
        for s in closing:
            s.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds[:STDIO]):  # (the parent flushed before the fork)
            os.dup2(fd, target)
            os.close(fd)
        from fedpacs.client import timing

        timing.reset(**{timing.LAUNCH: float(request["launched"]), timing.FORKED: time.time()})
        sys.argv = ["flwr-clientapp", *[str(a) for a in request["argv"]]]
        import torch

        torch.set_num_threads(_default_threads)  # the site's compute.threads applies later
        launcher()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child's failure is reported by its exit code
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


_default_threads = 1  # torch's own default, taken before the parent set itself to one
launcher = run_launcher  # what a child runs (tests put a stand-in here)


class WarmParent:
    """The fork server: accepts relays on ``socket_path``, forks a child per launch."""

    def __init__(self, socket_path: Path, config: str | None) -> None:
        self.socket_path, self.config = socket_path, config
        self.running: dict[int, Launch] = {}
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.parent.chmod(0o700)  # only this site's user reaches the socket
        socket_path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            raw, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, STDIO)
            request = json.loads(raw.decode())
            if len(fds) != STDIO or not isinstance(request.get("argv"), list):
                raise ValueError(f"expected arguments and {STDIO} file descriptors")
        except (OSError, ValueError) as err:
            log.error("warm parent: bad request from a relay: %s", err)
            conn.close()
            return
        if refresh(self.config):
            log.info("warm parent: the site config or data changed; reloaded")
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the parent's objects stay out of the child's collections: fewer
        # copy-on-write pages per child (Python's advice for a fork server)
        pid = os.fork()
        if pid == 0:
            _child(request, fds, [self.listener, conn, *(lc.conn for lc in self.running.values())])
        for fd in fds:
            os.close(fd)
        self.running[pid] = Launch(pid, conn)
        self.sel.register(conn, selectors.EVENT_READ, pid)

    def _from_relay(self, conn: socket.socket, pid: int) -> None:
        """A relay forwards a signal (its SuperExec stops it) or went away."""
        try:
            line = conn.recv(64).decode()
        except OSError:
            line = ""
        if line.startswith("signal "):
            try:
                os.kill(pid, int(line.split()[1]))
            except (ProcessLookupError, ValueError):
                pass
        elif not line:  # the relay is gone; the child finishes its message on its own
            self.sel.unregister(conn)

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            launch = self.running.pop(pid, None)
            if launch is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("warm parent: message process %d ended with %s after %.1fs",
                            pid, f"signal {-code}" if code < 0 else f"code {code}",
                            time.monotonic() - launch.started)
            try:
                self.sel.unregister(launch.conn)
            except (KeyError, ValueError):
                pass
            try:
                launch.conn.sendall(f"exit {code if code >= 0 else 128 - code}\n".encode())
            except OSError:
                pass
            launch.conn.close()

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(timeout=POLL_S):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._from_relay(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()
        for pid in list(self.running):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)


def serve(socket_path: Path, config: str | None) -> None:
    """Warm up, then serve launches until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.monotonic()
    done = warm_up(config)
    log.info("warm parent for site %s ready in %.1fs: %d train / %d val samples "
             "(data %.1fs)", done["site"], time.monotonic() - t0, done["train"], done["val"],
             done["load_s"])
    parent = WarmParent(socket_path, config)

    def stop(_signum: int, _frame: object) -> None:
        parent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent.serve()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="fedpacs-site-warm", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--config", default=None)
    args = ap.parse_args(argv)
    serve(args.socket, args.config)


if __name__ == "__main__":
    main()
