"""An in-process Grid for unit tests: messages go straight to the real ClientApp.

Each node has its own Context (its own site config and state), messages are deep-copied
both ways as a network would, every reply the server receives is kept in ``received``,
and ``tamper``/``drop`` hooks play a faulty site or a lost reply (a dropped message never
gets one: the server waits for it until its deadline).

Both ways of talking to sites work: ``push_messages``/``pull_messages`` (what the
ServerApp's FastGrid uses; each push is one exchange, counted in ``pushes``) and
``send_and_receive`` (a rogue server's stage in the SecAgg+ tests). Each message starts
the site's timing afresh, as a new ``flwr-clientapp`` process would (fedpacs.client.timing).
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpacs.client import timing

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
        self.pushes: list[list[Message]] = []  # the messages of each push (one exchange)
        self._ready: dict[str, Message] = {}  # replies not pulled yet, by request id

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def _deliver(self, msg: Message) -> Message | None:
        """Run the site's ClientApp on one message; its reply (None when dropped)."""
        nid = msg.metadata.dst_node_id
        if self.drop(nid, msg):
            return None
        timing.reset(**{timing.LAUNCH: time.time()})
        reply = self.app(copy.deepcopy(msg), self.contexts[nid])
        if self.tamper is not None and not reply.has_error():
            self.tamper(nid, reply)
        reply = copy.deepcopy(reply)
        self.received.append(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        self.pushes.append(batch)
        ids = []
        for msg in batch:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            reply = self._deliver(msg)
            if reply is not None:
                self._ready[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._ready.pop(i) for i in message_ids if i in self._ready]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return [r for r in map(self._deliver, messages) if r is not None]


def send_stage(grid: Grid, contents: dict[int, RecordDict], *, group_id: str = "1",
               message_type: str = "train") -> dict[int, Message]:
    """One message per node, as a (possibly malicious) server workflow would send it; the
    replies by node id (a dropped node has none)."""
    messages = [Message(content=content, dst_node_id=nid, message_type=message_type,
                        group_id=group_id) for nid, content in contents.items()]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}


def breastmnist_sites(folder: Path, data_dir: Path, *, n: int = 3, num_partitions: int = 0,
                      security: str = "") -> dict[int, Path]:
    """Site configs for LoopbackGrid (node id -> file): ``n`` BreastMNIST sites, each its
    own partition of ``num_partitions`` (0: ``n``), ``security`` appended as their
    [security] table's lines."""
    out = {}
    for i in range(n):
        p = folder / f"site{i}.toml"
        p.write_text(f'[site]\nname = "site-{i}"\ntask = "breastmnist"\n[data]\n'
                     f'format = "medmnist"\n'
                     f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\npartition = {i}\n'
                     f"num_partitions = {num_partitions or n}\n[compute]\nthreads = 1\n"
                     + (f"[security]\n{security}" if security else ""))
        out[i + 1] = p
    return out
