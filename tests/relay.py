"""A delaying, dropping TCP relay for end-to-end tests (standard library only).

    python tests/relay.py --listen 10.77.0.1:9192 --target 127.0.0.1:9092 --control ctl.json
    python -m tests.relay ...          (the same, from the repository root)

Each accepted connection is forwarded to ``--target``, bytes both ways, in order. The
impairments come from a JSON control file, re-read every ``--poll-s`` (0.2 s) when it
changes, so a test can change them mid-run (write it with :func:`write_control`, which
validates and replaces the file atomically)::

    {"delay_s": 0.2,        # latency added to every chunk, in each direction
     "rate_bps": 800000,    # bandwidth cap in BITS per second, each direction (null: none)
     "drop": 0.5,           # probability that a NEW connection is black-holed: accepted,
                            #   then nothing forwarded ever (the target never sees it)
     "blackhole": true,     # every connection, existing and new, stops forwarding; held
                            #   bytes (and held new connections) go on when it is false
     "reset": 1}            # when this value changes to a true value: close (RST) every
                            #   existing connection, once

A missing file or a missing key means no impairment. A file that is not valid is
reported on stderr and the previous impairments stay. Counts (connections, dropped,
bytes) are logged to stderr per connection and at exit (SIGTERM/SIGINT).

In-process (unit tests): ``with RelayThread(("127.0.0.1", 0), target, control) as r:``
then connect to ``r.port``; ``r.stats()`` and ``r.impairment()`` report state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any

CHUNK = 16 * 1024
QUEUE_CHUNKS = 16  # per direction: beyond this the relay stops reading (back-pressure)
POLL_S = 0.2
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class ControlError(ValueError):
    """The control file's content is not a valid impairment."""


@dataclass(frozen=True)
class Impairment:
    """What the relay does to traffic; see the module docstring."""

    delay_s: float = 0.0
    rate_bps: float | None = None
    drop: float = 0.0
    blackhole: bool = False
    reset: int | bool | str | None = None

    @classmethod
    def from_dict(cls, data: object) -> Impairment:
        if not isinstance(data, dict):
            raise ControlError(f"control: expected a JSON object, got {type(data).__name__}; "
                               'write e.g. {"delay_s": 0.1}')
        known = {f.name for f in fields(cls)}
        errors = [f"{key}: unknown key; expected one of {sorted(known)}"
                  for key in data if key not in known]

        def number(key: str, lo: float, hi: float, default: float | None) -> float | None:
            value = data.get(key, default)
            if value is None and default is None:
                return None
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or not lo <= value <= hi):
                errors.append(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
                return default
            return float(value)

        delay_s = number("delay_s", 0.0, 3600.0, 0.0)
        rate_bps = number("rate_bps", 1.0, 1e12, None)
        drop = number("drop", 0.0, 1.0, 0.0)
        blackhole = data.get("blackhole", False)
        if not isinstance(blackhole, bool):
            errors.append(f"blackhole: expected true or false, got {blackhole!r}")
            blackhole = False
        reset = data.get("reset")
        if not (reset is None or isinstance(reset, int | str)):
            errors.append(f"reset: expected a number, string, boolean or null, got {reset!r}; "
                          "change its value to close every connection once")
            reset = None
        if errors:
            raise ControlError("invalid relay control:\n  " + "\n  ".join(errors))
        return cls(delay_s=delay_s or 0.0, rate_bps=rate_bps, drop=drop or 0.0,
                   blackhole=blackhole, reset=reset)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_control(path: Path, impairment: Impairment | None = None, **changes: Any) -> Impairment:
    """Write ``impairment`` (default: none), with ``changes`` applied, to the control file
    ``path`` atomically (the relay never reads half a file); returns what was written."""
    value = replace(impairment or Impairment(), **changes)
    Impairment.from_dict(value.to_dict())  # validate before the relay sees it
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value.to_dict(), f)
    os.replace(tmp, path)
    return value


@dataclass
class RelayStats:
    """Counts since the relay started."""

    connections: int = 0  # accepted
    active: int = 0  # open now (forwarded or black-holed)
    dropped: int = 0  # black-holed by `drop`
    resets: int = 0  # connections closed by `reset`
    connect_failures: int = 0  # the target refused or did not answer
    bytes_up: int = 0  # client -> target, delivered
    bytes_down: int = 0  # target -> client, delivered

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 10.77.0.1:9192), got {text!r}")
    return host.strip("[]"), int(port)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), as a dropped path or a crashed
    peer would look."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    aborted: bool = False

    def abort(self) -> None:
        """Reset both ends now (buffered bytes are lost, as on a dead path)."""
        self.aborted = True
        for t in self.tasks:
            t.cancel()
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)

    async def close(self, timeout_s: float) -> None:
        """Close both ends after what is buffered has been sent."""
        writers = [w for w in (self.client, self.upstream) if w is not None]
        for w in writers:
            w.close()
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for w in writers)),
                                   timeout_s)
        except (OSError, TimeoutError):
            self.abort()


class Relay:
    """The relay's state and its asyncio server; run it with :meth:`serve`."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], control: Path, *,
                 poll_s: float = POLL_S, seed: int | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.listen = listen
        self.target = target
        self.control = control
        self.poll_s = poll_s
        self.connect_timeout_s = connect_timeout_s
        self.rng = random.Random(seed)
        self.stats = RelayStats()
        self.impairment = Impairment()
        self.port = 0  # the bound port, once serving
        self._control_key: tuple[int, int, int, int] | None = None
        self._conns: set[_Conn] = set()
        self._flowing: asyncio.Event | None = None  # set while not black-holed

    def log(self, message: str) -> None:
        print(f"relay {self.listen[0]}:{self.port}: {message}", file=sys.stderr, flush=True)

    # -- control -------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the control file if it changed (mtime or size)."""
        try:
            st = self.control.stat()
        except FileNotFoundError:
            st = None
        key = None if st is None else (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if key == self._control_key:
            return
        try:
            text = "{}" if st is None else self.control.read_text()
        except OSError as e:
            self.log(f"cannot read control file {self.control}: {e}")
            return
        self._control_key = key
        try:
            new = Impairment.from_dict(json.loads(text))
        except (json.JSONDecodeError, ControlError) as e:
            self.log(f"control file {self.control} ignored (previous settings stay): {e}")
            return
        self.apply(new)

    def apply(self, new: Impairment) -> None:
        old, self.impairment = self.impairment, new
        if new != old:
            self.log(f"impairment {new.to_dict()}")
        if self._flowing is not None:
            if new.blackhole:
                self._flowing.clear()
            else:
                self._flowing.set()
        if new.reset != old.reset and new.reset:
            conns = list(self._conns)
            self.stats.resets += len(conns)
            for conn in conns:
                conn.abort()
            self.log(f"reset: closed {len(conns)} connection(s); {self.stats.line()}")

    async def _poll_control(self) -> None:
        while True:
            self.reload()
            await asyncio.sleep(self.poll_s)

    # -- forwarding ----------------------------------------------------------------
    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: bool) -> None:
        """One direction: read chunks, hold each for the delay (and while black-holed),
        pace them to the rate, write them in order. EOF is passed on as a half-close; a
        reset as ConnectionResetError (the connection is then reset both ways)."""
        assert self._flowing is not None
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    await queue.put((time.monotonic(), data))
            except OSError:
                await queue.put((time.monotonic(), None))
                return
            await queue.put((time.monotonic(), b""))

        reading = asyncio.create_task(read())
        try:
            next_free = 0.0
            while True:
                stamp, data = await queue.get()
                while (wait := stamp + self.impairment.delay_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if data is None:
                    raise ConnectionResetError(f"{'client' if up else 'target'} reset")
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                rate = self.impairment.rate_bps
                if rate:
                    next_free = max(next_free, time.monotonic()) + len(data) * 8 / rate
                    while (wait := next_free - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.stats.connections += 1
        self.stats.active += 1
        conn = _Conn(self.stats.connections, writer)
        self._conns.add(conn)
        peer = writer.get_extra_info("peername")
        clean = False
        try:
            if self.rng.random() < self.impairment.drop:
                self.stats.dropped += 1
                self.log(f"conn {conn.number} from {peer}: dropped (black-holed)")
                await self._discard(reader)
                return
            await self._flowing.wait()  # a new connection on a dead path goes nowhere
            if conn.aborted:
                return
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self.connect_timeout_s)
            except (OSError, TimeoutError) as e:
                self.stats.connect_failures += 1
                self.log(f"conn {conn.number} from {peer}: target {self.target} failed: {e!r}")
                return
            conn.upstream = upstream
            if conn.aborted:
                return
            self.log(f"conn {conn.number} from {peer}: open")
            conn.tasks = [asyncio.create_task(self._pipe(reader, upstream, up=True)),
                          asyncio.create_task(self._pipe(up_reader, writer, up=False))]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            results = await asyncio.gather(*conn.tasks, return_exceptions=True)
            clean = all(r is None for r in results)
        except ConnectionError:
            pass
        finally:
            self._conns.discard(conn)
            self.stats.active -= 1
            if clean:
                await conn.close(self.connect_timeout_s)
            else:
                conn.abort()
            self.log(f"conn {conn.number} closed; {self.stats.line()}")

    async def serve(self, stop: asyncio.Event, bound: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set; ``bound`` is set once the port listens."""
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.reload()
        server = await asyncio.start_server(self._handle, *self.listen, reuse_address=True)
        self.port = int(server.sockets[0].getsockname()[1])
        self.log(f"listening, forwarding to {self.target[0]}:{self.target[1]}")
        if bound is not None:
            bound.set()
        poller = asyncio.create_task(self._poll_control())
        try:
            async with server:
                await stop.wait()
        finally:
            poller.cancel()
            for conn in list(self._conns):
                conn.abort()
            self.log(f"stopped; {self.stats.line()}")


class RelayThread:
    """A :class:`Relay` on its own event loop in a thread, as a context manager."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], control: Path, *,
                 poll_s: float = POLL_S, seed: int | None = None) -> None:
        self.relay = Relay(listen, target, control, poll_s=poll_s, seed=seed)
        self._bound = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="relay", daemon=True)

    @property
    def port(self) -> int:
        return self.relay.port

    def stats(self) -> RelayStats:
        return replace(self.relay.stats)

    def impairment(self) -> Impairment:
        return self.relay.impairment

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.relay.serve(self._stop, self._bound)

        try:
            asyncio.run(main())
        except OSError as e:  # e.g. the listen address is taken: reported by __enter__
            self._error = e
            self._bound.set()

    def __enter__(self) -> RelayThread:
        self._thread.start()
        if not self._bound.wait(timeout=START_TIMEOUT_S):
            raise TimeoutError(f"relay did not listen within {START_TIMEOUT_S:.0f}s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise TimeoutError(f"relay thread did not stop within {STOP_TIMEOUT_S:.0f}s")


def relay_argv(listen: tuple[str, int], target: tuple[str, int], control: Path, *,
               python: str = sys.executable) -> list[str]:
    """The command line that runs this relay as a process (put ``host.argv`` around it to
    run it in a namespace); needs no working directory or installed package."""
    # -I: no user site, no PYTHON* variables and (3.11+) no script directory on sys.path
    return [python, "-I", str(Path(__file__).resolve()), "--listen", f"{listen[0]}:{listen[1]}",
            "--target", f"{target[0]}:{target[1]}", "--control", str(control)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", type=parse_addr, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=parse_addr, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", type=Path, required=True, help="JSON control file")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="control re-read interval")
    parser.add_argument("--seed", type=int, default=None, help="seed for `drop` decisions")
    args = parser.parse_args(argv)
    relay = Relay(args.listen, args.target, args.control, poll_s=args.poll_s, seed=args.seed)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await relay.serve(stop)

    try:
        asyncio.run(run())
    except OSError as e:
        print(f"relay: cannot listen on {args.listen[0]}:{args.listen[1]}: {e}; "
              "choose a free port on an address of this host (namespace)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
