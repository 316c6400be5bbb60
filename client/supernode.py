"""The site's SuperNode: Flower's ``flower-supernode`` with shorter idle waits.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it asks the SuperLink for a message
and finds none, and polls its own store every 0.5 s for the ClientApp's reply
(``flwr.supernode.start_client_internal``); a round of four exchanges could wait ~14 s on
those sleeps alone. This launcher runs the same SuperNode with those two waits shortened
(to :data:`IDLE_PULL_S` and :data:`REPLY_POLL_S`; every other sleep is kept). It changes
the ``time`` the module sees; tests/test_gate.py pins the two sleeps, so a Flower upgrade
that moves them fails the tests instead of silently slowing sites down.

One fix: Flower's loop pushes replies only right after it pulled a message, and then
pushes every reply it has. When a late reply to a stopped run is pushed (and refused) in
the cycle of the next run's first message, that message's own reply, made a moment
later, waits for a message that never comes (the server waits for this reply): the site
misses the round until it times out. :func:`push_pending_replies` makes a pull that finds
no message but a reply waiting go on to push it.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

IDLE_PULL_S = 0.25  # between two pulls that found no message (Flower: 3 s)
REPLY_POLL_S = 0.05  # between two looks for the ClientApp's reply (Flower: 0.5 s)
POLL_ENV = "FEDPACS_SUPERNODE_IDLE_PULL_S"  # a site's own idle interval (load tests)
FLOWER_IDLE_PULL_S = 3  # the sleeps replaced, as Flower 1.41 writes them
FLOWER_REPLY_POLL_S = 0.5


class QuickTime:
    """The ``time`` module, with Flower's two loop sleeps shortened."""

    def __init__(self, real: ModuleType, replace: dict[float, float]) -> None:
        self._real, self._replace = real, replace

    def sleep(self, seconds: float) -> None:
        self._real.sleep(self._replace.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def quick_time() -> QuickTime:
    idle = float(os.environ.get(POLL_ENV, "") or IDLE_PULL_S)
    return QuickTime(time, {FLOWER_IDLE_PULL_S: idle, FLOWER_REPLY_POLL_S: REPLY_POLL_S})


def pending_reply_run(state: Any) -> int | None:
    """The run id of a reply in the SuperNode's state that no push has taken yet (None
    when there is none). Reads Flower 1.41's in-memory NodeState without marking anything
    (``get_messages_legacy`` would mark what it returns as taken)."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return None
    with lock:
        for entry in store.values():
            meta = entry.message.metadata
            if not entry.is_retrieved and meta.reply_to_message_id:
                return int(meta.run_id)
    return None


def push_pending_replies(internal: Any) -> None:
    """Patch the SuperNode loop's pull so that, finding no message, it reports a waiting
    reply's run: the loop then pushes that reply at once (see the module docstring)."""
    pull = internal._pull_and_store_message

    def pull_or_pending(**kwargs: Any) -> int | None:
        run_id: int | None = pull(**kwargs)
        return pending_reply_run(kwargs["state"]) if run_id is None else run_id

    internal._pull_and_store_message = pull_or_pending


def main() -> None:
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedpacs.common.flowertune import quick_object_pulls

    internal.time = quick_time()  # type: ignore[assignment]  # pinned: tests/test_gate.py
    push_pending_replies(internal)  # pinned: tests/test_gate.py
    quick_object_pulls()
    flower_supernode()


if __name__ == "__main__":
    main()
