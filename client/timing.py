"""Where a site's message time goes: a few timestamps, taken as the message is handled.

The relay (``flwr-clientapp`` in the gate folder), the warm parent that forks the
message's process, and the handlers each mark a point; :func:`phases` turns them into the
seconds of each phase, which the site sends back as ``t-*`` metrics (a number per phase,
no names of files or patients) and the server records per round. Light on purpose: the
relay imports it before anything else.
"""

from __future__ import annotations

import os
import time

LAUNCH = "launch"  # the task's launcher (the relay, or flwr-clientapp itself) started
FORKED = "forked"  # the warm parent forked this message's process (warm sites only)
READY = "ready"  # imports done, the handler starts
DATA = "data"  # the site's data set is ready (cached or loaded)
EVALUATED = "evaluated"  # the incoming global model has been evaluated
TRAINED = "trained"  # local training has finished

_marks: dict[str, float] = {}


def mark(point: str, at: float | None = None) -> None:
    _marks[point] = time.time() if at is None else at


def reset(**points: float) -> None:
    """Start a new message's marks (a forked process inherits its parent's)."""
    _marks.clear()
    _marks.update(points)


def marks() -> dict[str, float]:
    return dict(_marks)


def process_started() -> float:
    """When this process was created (epoch seconds), from /proc; now where unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def phases(now: float | None = None) -> dict[str, float]:
    """Seconds per phase, as ``t-*`` metric names: ``t-start`` (launcher to fork or to
    the interpreter), ``t-imports`` (to the handler), ``t-data``, ``t-evaluate``,
    ``t-train`` and ``t-site`` (launch to now: all the site spent on the message)."""
    m, end = _marks, time.time() if now is None else now
    out: dict[str, float] = {}
    if LAUNCH in m:
        out["t-site"] = end - m[LAUNCH]
        if FORKED in m:
            out["t-start"] = m[FORKED] - m[LAUNCH]
    if READY in m:
        out["t-imports"] = m[READY] - m.get(FORKED, m.get(LAUNCH, m[READY]))
        last = m[READY]
        for point, name in ((DATA, "t-data"), (EVALUATED, "t-evaluate"), (TRAINED, "t-train")):
            if point in m:
                out[name] = m[point] - last
                last = m[point]
    return {k: round(max(v, 0.0), 4) for k, v in out.items()}
