"""The ServerApp's one way to the sites: Flower's Grid with short polling and a log.

Flower 1.41's HTTP grid (``superlink/grid/http_grid.py``) sleeps a fixed 3 s between
pulls in ``send_and_receive``: a reply that arrives just after a pull waits up to 3 s, on
every exchange (five per SecAgg+ round before this module). :class:`FastGrid` wraps the
run's grid, delegates everything to it, and does ``send_and_receive`` itself with only
the public API: ``push_messages`` once, then ``pull_messages`` every :data:`POLL_S`
seconds until every reply is in or the deadline passes. It also keeps a typed log of
its exchanges (:class:`Exchange`), from which each round's timing is recorded.

``tests/test_fastgrid.py`` pins the signatures of the Grid methods used here, so a flwr
upgrade that changes them fails there, loudly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpacs.common.errors import parse_coded

POLL_S = 0.1  # seconds between two pulls of the replies still awaited


@dataclass(frozen=True)
class Exchange:
    """One send-and-receive with the sites: what was sent (message type, and the SecAgg+
    stage when the messages carry one), how many messages and replies, and the wall
    seconds from the push to the last reply (or to the deadline)."""

    kind: str
    stage: str
    sent: int
    replies: int
    seconds: float
    # monotonic clock when it ended (not written: only the run's own arithmetic uses it)
    ended: float = field(default=0.0, compare=False)
    # the error replies among ``replies``, each as :func:`error_label` names it
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "stage": self.stage, "sent": self.sent,
                "replies": self.replies, "seconds": round(self.seconds, 4)} | (
            {"errors": list(self.errors)} if self.errors else {})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Exchange:
        return cls(str(d["kind"]), str(d.get("stage", "")), int(d["sent"]),
                   int(d["replies"]), float(d["seconds"]),
                   errors=tuple(str(e) for e in d.get("errors") or ()))

    @property
    def name(self) -> str:
        """``train``, ``evaluate``, or ``train/<stage>`` under SecAgg+."""
        return f"{self.kind}/{self.stage}" if self.stage else self.kind


def error_label(reply: Message) -> str:
    """An error reply as the run records it: a site's coded reason as its code and type
    (``FP010 PolicyError``), else the error's code alone (``uncoded error 3``: Flower's
    own, such as a node that was unavailable, or a reason not in fedpacs' coded form);
    never the reply's free text."""
    coded = parse_coded(reply.error.reason or "")
    if coded is not None:
        return f"FP{coded[0]:03d} {coded[1]}"
    return f"uncoded error {int(reply.error.code)}"


def secagg_stage(content: RecordDict) -> str:
    """The SecAgg+ stage a message's content asks for ("" for a plain message)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    return stage if isinstance(stage, str) else ""


class FastGrid(Grid):
    """``grid`` with a short-polling ``send_and_receive`` and a log of every exchange.

    A ``timeout`` of None (Flower's "no limit") waits ``default_timeout_s``: every wait
    has a deadline. An exchange of no messages is answered at once and not logged."""

    def __init__(self, grid: Grid, *, default_timeout_s: float) -> None:
        self.grid = grid
        self.default_timeout_s = default_timeout_s
        self.exchanges: list[Exchange] = []

    # --- delegated as they are -------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # --- the exchange -----------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull every :data:`POLL_S` s until each has its reply
        or ``timeout`` seconds have passed; returns the replies that arrived (at the
        deadline, those so far) ordered by the site (node id) that sent them, so an
        aggregate sums the same updates in the same order whichever site answers first
        and whichever order the strategy sampled the sites in."""
        out = list(messages)
        if not out:
            return []
        kinds = sorted({m.metadata.message_type for m in out})
        stages = sorted({secagg_stage(m.content) for m in out if m.has_content()} - {""})
        started = time.monotonic()
        deadline = started + (self.default_timeout_s if timeout is None else timeout)
        # (the HTTP grid returns None for a message it could not push: no reply comes)
        pushed = [i for i in self.grid.push_messages(out) if i]
        order = {mid: n for n, mid in enumerate(pushed)}
        waiting = set(pushed)
        replies: list[Message] = []
        while waiting:
            got = list(self.grid.pull_messages(list(waiting)))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            time.sleep(min(POLL_S, left))
        ended = time.monotonic()
        replies.sort(key=lambda m: (m.metadata.src_node_id,
                                    order.get(m.metadata.reply_to_message_id, len(order))))
        self.exchanges.append(Exchange("+".join(kinds), "+".join(stages), len(out),
                                       len(replies), ended - started, ended, tuple(
                                           error_label(m) for m in replies
                                           if m.has_error())))
        return replies
