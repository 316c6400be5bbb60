"""FastGrid: short polling through Flower's public Grid API, deadlines, and its log.

A fake grid makes each reply available some time after the push (or never), the way a
SuperLink holds a reply until its site has sent it. The last test pins the Grid methods
FastGrid relies on: a flwr upgrade that changes them fails here, loudly.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpacs.common.errors import ExitCode, coded_reason
from fedpacs.server.grid import POLL_S, Exchange, FastGrid

pytestmark = pytest.mark.usefixtures("task_identity")

FLOWER_POLL_S = 3.0  # what Flower 1.41's HTTP grid sleeps between two pulls


class DelayedGrid(Grid):
    """Replies become available ``delays[node]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None],
                 errors: dict[int, Error] | None = None) -> None:
        self.delays = delays
        self.errors = errors or {}  # nodes that answer with this error
        self.pending: dict[str, tuple[float, Message]] = {}
        self.pulls = 0
        self.pushed: list[list[Message]] = []

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        self.pushed.append(batch)
        ids = []
        for i, msg in enumerate(batch):
            mid = f"m{len(self.pushed)}-{i}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                error = self.errors.get(msg.metadata.dst_node_id)
                reply = Message(error=error, reply_to=msg) if error is not None else \
                    Message(RecordDict({"site": ConfigRecord({"n": i})}), reply_to=msg)
                self.pending[mid] = (time.monotonic() + delay, reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now = time.monotonic()
        ready = [i for i in message_ids if i in self.pending and self.pending[i][0] <= now]
        return [self.pending.pop(i)[1] for i in ready]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("FastGrid must not call the wrapped grid's send_and_receive")


def _messages(nodes: Iterable[int], content: RecordDict | None = None) -> list[Message]:
    return [Message(content if content is not None else RecordDict(), dst_node_id=n,
                    message_type=MessageType.TRAIN) for n in nodes]


def _timed(grid: FastGrid, messages: list[Message], timeout: float | None
           ) -> tuple[list[Message], float]:
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return replies, time.monotonic() - t0


def test_returns_as_soon_as_every_reply_is_in() -> None:
    inner = DelayedGrid({1: 0.05, 2: 0.2, 3: 0.3})
    grid = FastGrid(inner, default_timeout_s=60)
    replies, took = _timed(grid, _messages([1, 2, 3]), timeout=30)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    # within one poll of the last reply: far from Flower's 3 s sleep, far from the deadline
    assert 0.3 <= took < 0.3 + POLL_S + 0.25 < FLOWER_POLL_S
    assert 3 <= inner.pulls <= 0.3 / POLL_S + 3
    [ex] = grid.exchanges
    assert (ex.kind, ex.stage, ex.sent, ex.replies) == ("train", "", 3, 3)
    assert ex.seconds == pytest.approx(took, abs=0.05)



def test_replies_come_back_in_site_order() -> None:
    """Whichever site answers first and whichever order the sites were sampled in, an
    aggregate sums the updates in one order, so two runs of one config (or a resumed run
    and an uninterrupted one) give the same model."""
    grid = FastGrid(DelayedGrid({1: 0.3, 2: 0.05, 3: 0.15}), default_timeout_s=60)
    replies = list(grid.send_and_receive(_messages([3, 1, 2]), timeout=30))
    assert [r.metadata.src_node_id for r in replies] == [1, 2, 3]

def test_deadline_returns_the_replies_so_far() -> None:
    inner = DelayedGrid({1: 0.0, 2: None, 3: 5.0})  # 2 never replies, 3 after the deadline
    grid = FastGrid(inner, default_timeout_s=60)
    replies, took = _timed(grid, _messages([1, 2, 3]), timeout=0.5)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert 0.5 <= took < 0.5 + POLL_S + 0.25
    assert grid.exchanges[-1].replies == 1 and grid.exchanges[-1].sent == 3


def test_error_replies_are_logged_by_code_never_by_their_words() -> None:
    """A site's coded refusal is kept as its code and type; any other error (Flower's own,
    or a reason a site wrote itself) as its error code alone."""
    errors = {1: Error(int(ExitCode.POLICY), coded_reason(ExitCode.POLICY, "PolicyError")),
              2: Error(int(ExitCode.POLICY), "FP010 PolicyError: /data/patient-1234.dcm"),
              3: Error(3, "node unavailable")}
    grid = FastGrid(DelayedGrid({1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, errors),
                    default_timeout_s=60)
    replies = list(grid.send_and_receive(_messages([1, 2, 3, 4]), timeout=10))
    assert len(replies) == 4
    [ex] = grid.exchanges
    assert ex.errors == ("FP010 PolicyError", "uncoded error 10", "uncoded error 3")
    assert Exchange.from_json(ex.to_json()).errors == ex.errors
    assert "patient" not in str(ex.to_json())


def test_no_timeout_waits_the_default_deadline_not_forever() -> None:
    grid = FastGrid(DelayedGrid({1: None}), default_timeout_s=0.3)
    replies, took = _timed(grid, _messages([1]), timeout=None)
    assert replies == [] and 0.3 <= took < 0.3 + POLL_S + 0.25


def test_an_empty_exchange_sends_nothing_and_is_not_logged() -> None:
    inner = DelayedGrid({1: 0.0})
    grid = FastGrid(inner, default_timeout_s=60)
    assert list(grid.send_and_receive([], timeout=10)) == []
    assert inner.pushed == [] and inner.pulls == 0 and grid.exchanges == []


def test_logs_the_secagg_stage_and_delegates_the_rest() -> None:
    inner = DelayedGrid({1: 0.0, 2: 0.0})
    grid = FastGrid(inner, default_timeout_s=60)
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS})})
    grid.send_and_receive(_messages([1, 2], content), timeout=5)
    ex = grid.exchanges[-1]
    assert (ex.kind, ex.stage, ex.name) == ("train", Stage.SHARE_KEYS, "train/share_keys")
    assert Exchange.from_json(ex.to_json()).to_json() == ex.to_json()
    assert list(grid.get_node_ids()) == [1, 2]
    assert [n.node_id for n in grid.get_nodes()] == [1, 2]
    assert grid.run.run_id == 1
    ids = list(grid.push_messages(_messages([1])))
    assert [m.metadata.src_node_id for m in grid.pull_messages(ids)] == [1]


def _params(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


def test_the_public_grid_api_fastgrid_relies_on() -> None:
    """FastGrid calls push_messages(messages) -> ids and pull_messages(ids) -> replies,
    matched by ``reply_to_message_id``, and stands in for send_and_receive(messages, *,
    timeout). If flwr changes any of these, FastGrid must be revisited."""
    P = inspect.Parameter
    assert _params(Grid.push_messages) == [("self", P.POSITIONAL_OR_KEYWORD, P.empty),
                                           ("messages", P.POSITIONAL_OR_KEYWORD, P.empty)]
    assert _params(Grid.pull_messages) == [("self", P.POSITIONAL_OR_KEYWORD, P.empty),
                                           ("message_ids", P.POSITIONAL_OR_KEYWORD, P.empty)]
    assert _params(Grid.send_and_receive) == [
        ("self", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("messages", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("timeout", P.KEYWORD_ONLY, None)]
    assert set(Grid.__abstractmethods__) == {"set_run", "run", "create_message",
                                             "get_node_ids", "push_messages",
                                             "pull_messages", "send_and_receive"}
    # the HTTP grid the ServerApp gets keeps the same signatures
    from flwr.superlink.grid.http_grid import HttpGrid

    for name in ("push_messages", "pull_messages", "send_and_receive"):
        assert _params(getattr(HttpGrid, name)) == _params(getattr(Grid, name)), name
    reply = Message(RecordDict(), reply_to=Message(RecordDict(), dst_node_id=1,
                                                   message_type=MessageType.TRAIN))
    assert hasattr(reply.metadata, "reply_to_message_id")


# --- rounds over the real ServerApp and ClientApp (tests/loopback.py) --------------------

def _plain_sites(tmp_path: Path, data_dir: Path, n: int = 3) -> dict[int, Path]:
    from tests.loopback import breastmnist_sites

    return breastmnist_sites(tmp_path, data_dir, n=n, security="require_secagg = false\n")


def test_a_plain_round_is_one_exchange_and_every_round_has_its_evaluation(
        tmp_path: Path, data_dir: Path) -> None:
    import json

    import torch
    from flwr.app import Context

    from fedpacs.client.app import app as client_app
    from fedpacs.client.config import load_site_config
    from fedpacs.client.data import load_site_data
    from fedpacs.common.artifacts import load_model
    from fedpacs.common.config import RunConfig
    from fedpacs.common.engine import evaluate
    from fedpacs.server.app import FederatedRun
    from tests.loopback import LoopbackGrid

    sites = _plain_sites(tmp_path, data_dir)
    cfg = RunConfig(task="breastmnist", rounds=2, local_epochs=1, batch_size=32, min_sites=3,
                    secagg=False, cross_site=True, round_timeout_s=60.0,
                    run_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(client_app, sites)
    run = FederatedRun(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    run.run()

    # one train message per site per round, then one evaluate exchange of the final model;
    # cross-site validation of the global model is that evaluation (no further exchange)
    assert [(p[0].metadata.message_type, sorted(m.metadata.dst_node_id for m in p))
            for p in grid.pushes] == [("train", [1, 2, 3])] * 2 + [("evaluate", [1, 2, 3])]
    root = Path(cfg.run_dir)
    rounds = json.loads((root / "metrics.json").read_text())["rounds"]
    names = {"site-0", "site-1", "site-2"}
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # every round, the initial model too, has the sites' evaluation
        assert set(r["evaluate_sites"]) == names and "val-accuracy" in r["evaluate"]
        one = json.loads((root / "rounds" / f"round-{r['round']:03d}" / "metrics.json")
                         .read_text())
        assert one == r
    # ... equal to an independent evaluation of that round's checkpoint on the site's split
    site = load_site_config(sites[2])
    task = cfg.task_config()
    val = load_site_data(site.data, task, preprocess=site.preprocess).val
    for r in rounds:
        model, _ = load_model(root / "rounds" / f"round-{r['round']:03d}" / "model.pt",
                              device="cpu")
        expected = evaluate(model, val, task=task, device=torch.device("cpu"))
        got = r["evaluate_sites"]["site-1"]
        assert got["num-examples"] == len(val)
        for k, v in expected.items():
            assert got[f"val-{k}"] == pytest.approx(v, abs=1e-5), (r["round"], k)
    card = json.loads((root / "final" / "model_card.json").read_text())
    assert card["cross_site"]["global"] == {
        s: {k[4:] if k.startswith("val-") else k: v for k, v in m.items()}
        for s, m in rounds[-1]["evaluate_sites"].items()}
    # the timing of each round: its one exchange, the sites' phases, the server's parts
    assert rounds[0]["timing"]["exchanges"] == []
    for r in rounds[1:]:
        t = r["timing"]
        assert [(e["kind"], e["sent"], e["replies"]) for e in t["exchanges"]] == [
            ("train", 3, 3)]
        assert set(t["sites"]) == names and set(t["site_max"]) >= {"t-train", "t-evaluate"}
        assert t["site_max"]["t-evaluate"] > 0 and t["slowest_train_s"] > 0
        assert t["overhead_s"] >= 0 and t["round_s"] >= t["exchanges"][0]["seconds"]
        assert t["overhead_s"] == pytest.approx(t["round_s"] - t["slowest_train_s"], abs=1e-3)
        assert set(r["train_sites"]["site-0"]) == {"num-examples", "train-loss",
                                                   "train-seconds"}
        assert "val-accuracy" not in r["train"] and "t-train" not in r["train"]
    assert [e["kind"] for e in card["exchanges"]] == ["train", "train", "evaluate"]
    # ... and as Prometheus series
    registry = run.metrics.registry
    assert registry.get_sample_value("fedpacs_round_exchanges") == 1
    assert registry.get_sample_value("fedpacs_round_phase_seconds", {"phase": "round"}) == \
        pytest.approx(rounds[2]["timing"]["round_s"], abs=1e-3)
    ratio = registry.get_sample_value("fedpacs_round_overhead_ratio")
    assert ratio is not None and 0 <= ratio < 1
    assert registry.get_sample_value("fedpacs_federated_eval_metric",
                                     {"metric": "accuracy"}) == pytest.approx(
        rounds[2]["evaluate"]["val-accuracy"])
