"""An in-process Grid for unit tests: messages go straight to the real ClientApp.

Each node has its own Context (its own site config and state), messages are deep-copied
both ways as a network would, every reply the server receives is kept in ``received``,
and ``tamper``/``drop`` hooks play a faulty site or a lost reply.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

Hook = Callable[[int, Message], bool]


class LoopbackGrid(Grid):
    def __init__(self, app: ClientApp, sites: dict[int, Path], *,
                 drop: Hook | None = None,
                 tamper: Callable[[int, Message], None] | None = None) -> None:
        self.app = app
        self.contexts = {nid: Context(run_id=1, node_id=nid,
                                      node_config={"site-config": str(path)},
                                      state=RecordDict(), run_config={})
                         for nid, path in sites.items()}
        self.drop = drop or (lambda nid, msg: False)
        self.tamper = tamper
        self.received: list[Message] = []

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if self.drop(nid, msg):
                continue
            reply = self.app(copy.deepcopy(msg), self.contexts[nid])
            if self.tamper is not None and not reply.has_error():
                self.tamper(nid, reply)
            reply = copy.deepcopy(reply)
            self.received.append(reply)
            replies.append(reply)
        return replies


def send_stage(grid: Grid, contents: dict[int, RecordDict], *, group_id: str = "1",
               message_type: str = "train") -> dict[int, Message]:
    """One message per node, as a (possibly malicious) server workflow would send it; the
    replies by node id (a dropped node has none)."""
    messages = [Message(content=content, dst_node_id=nid, message_type=message_type,
                        group_id=group_id) for nid, content in contents.items()]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
