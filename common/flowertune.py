"""Flower 1.41's object pulls, with short retries.

A message travels as a tree of objects (the message, its records, each array and its
chunks); a receiver pulls each object and, when one is not there yet (the sender is still
pushing it), retries after 1 s, then 2 s, 4 s ... up to 10 s
(``flwr.supercore.inflatable.inflatable_utils.pull_objects``). On a loopback or LAN link
an object is usually there a few milliseconds later, so a model could wait seconds per
message on the backoff alone. :func:`quick_object_pulls` lowers the defaults of the two
functions every receiver calls (the ClientApp, the SuperNode, the ServerApp's grid) to
:data:`INITIAL_BACKOFF_S` doubling up to :data:`BACKOFF_CAP_S`; Flower's overall limits
(tries, total time) stay. tests/test_gate.py pins the parameters and the callers that
rely on the defaults, so an upgrade that changes them fails the tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

INITIAL_BACKOFF_S = 0.02  # Flower: 1 s
BACKOFF_CAP_S = 0.5  # Flower: 10 s


def set_default(fn: Callable[..., Any], name: str, value: object) -> None:
    """Change the default of parameter ``name`` of ``fn`` (keyword-only or not)."""
    params = list(inspect.signature(fn).parameters.values())
    kwdefaults = fn.__kwdefaults__ or {}
    if name in kwdefaults:
        fn.__kwdefaults__ = kwdefaults | {name: value}
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = list(fn.__defaults__ or ())
    index = [p.name for p in positional].index(name) - (len(positional) - len(defaults))
    if index < 0:
        raise ValueError(f"{fn.__qualname__}: parameter {name!r} has no default")
    defaults[index] = value
    fn.__defaults__ = tuple(defaults)


def quick_object_pulls() -> None:
    """Short retries for every object pull in this process (idempotent)."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        set_default(fn, "initial_backoff", INITIAL_BACKOFF_S)
        set_default(fn, "backoff_cap", BACKOFF_CAP_S)
