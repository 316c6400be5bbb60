"""The site's own SecAgg+ floor (``client/secagg_policy.py: check_secagg_request``), rule by rule.

The states checked against are the ones Flower's ``secaggplus_mod`` keeps: an honest
three-site round is driven through the real mod, and each test breaks one rule of one
stage's request. The attacks themselves, through the whole ClientApp, are in
``tests/test_secagg.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from fedpacs.client.config import SecurityConfig
from fedpacs.client.secagg_policy import check_secagg_request
from fedpacs.common.errors import FieldError

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (11, 22, 33)
SITE = 11  # the site whose checks are tested
F = f"{RECORD_KEY_CONFIGS}."
POLICY = SecurityConfig()  # the defaults: at least 3 sites, threshold at least 2
Request = dict[str, ConfigRecordValues]




def setup(n: int = 3, m: int = 3, t: int = 2) -> Request:
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: m,
            Key.THRESHOLD: t, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**24,
            Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0}


def _fit(msg: Message, context: Context) -> Message:
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(4, np.float32)]), 10, {})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


@dataclass
class Round:
    """An honest round through Flower's mod: per stage, SITE's state just before it and
    the request an honest server sends SITE."""

    states: dict[str, ConfigRecord]
    requests: dict[str, Request]

    def check(self, which: str, changes: Request | None = None, policy: SecurityConfig = POLICY,
              *, round_id: str = "1", setup_round_id: str | None = "1") -> list[FieldError]:
        """SITE's check of the honest ``which`` request with ``changes`` made to it."""
        request = ConfigRecord(self.requests[which] | (changes or {}))
        return check_secagg_request(request, self.states[which], policy, round_id=round_id,
                                    setup_round_id=setup_round_id)


@pytest.fixture
def honest() -> Round:
    contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(),
                             run_config={}) for nid in NODES}
    states: dict[str, ConfigRecord] = {}
    requests: dict[str, Request] = {}

    def run(stage: str, per_node: dict[int, Request]
            ) -> dict[int, ConfigRecord]:
        records = contexts[SITE].state.config_records
        states[stage] = ConfigRecord(dict(records.get(RECORD_KEY_STATE, ConfigRecord())))
        requests[stage] = dict(per_node[SITE])
        out = {}
        for nid, cfg in per_node.items():
            msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(cfg))}),
                          dst_node_id=nid, message_type=MessageType.TRAIN, group_id="1")
            reply = secaggplus_mod(msg, contexts[nid], _fit)
            out[nid] = reply.content.config_records[RECORD_KEY_CONFIGS]
        return out

    keys = run(Stage.SETUP, {nid: setup() for nid in NODES})
    pks: Request = {str(nid): [_bytes(keys[nid][Key.PUBLIC_KEY_1]),
                               _bytes(keys[nid][Key.PUBLIC_KEY_2])] for nid in NODES}
    shares = run(Stage.SHARE_KEYS, {nid: {Key.STAGE: Stage.SHARE_KEYS} | pks for nid in NODES})
    srcs: dict[int, list[int]] = {nid: [] for nid in NODES}
    ctxts: dict[int, list[bytes]] = {nid: [] for nid in NODES}
    for src, rec in shares.items():
        dsts, cts = rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST]
        assert isinstance(dsts, list) and isinstance(cts, list)
        for dst, ct in zip(dsts, cts, strict=True):
            assert isinstance(dst, int)
            srcs[dst].append(src)
            ctxts[dst].append(_bytes(ct))
    run(Stage.COLLECT_MASKED_VECTORS, {nid: {
        Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: srcs[nid],
        Key.CIPHERTEXT_LIST: ctxts[nid]} for nid in NODES})
    run(Stage.UNMASK, {nid: {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(NODES),
                             Key.DEAD_NODE_ID_LIST: []} for nid in NODES})
    return Round(states, requests)


def _bytes(v: object) -> bytes:
    assert isinstance(v, bytes)
    return v


def fields(errors: list[FieldError]) -> list[str]:
    return [e.field for e in errors]


def test_an_honest_round_passes_every_stage(honest: Round) -> None:
    assert honest.check(Stage.SETUP, setup_round_id=None) == []
    for stage in (Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
        assert honest.check(stage) == [], stage
    # a site may raise its own floor; the honest 3-site round then falls short
    strict = SecurityConfig(secagg_min_sites=4)
    assert fields(honest.check(Stage.SETUP, {}, strict, setup_round_id=None)) == [
        F + Key.SAMPLE_NUMBER, F + Key.SHARE_NUMBER]


def test_threshold_below_the_site_floor(honest: Round) -> None:
    errs = honest.check(Stage.SETUP, setup(n=5, m=5, t=3),
                        SecurityConfig(secagg_min_threshold=4), setup_round_id=None)
    assert fields(errs) == [F + Key.THRESHOLD]
    assert "secagg_min_threshold" in errs[0].expected and errs[0].got == "3"
    assert "secagg_min_threshold" in errs[0].fix


def test_threshold_that_is_not_a_strict_majority(honest: Round) -> None:
    errs = honest.check(Stage.SETUP, setup(n=4, m=4, t=2), setup_round_id=None)
    assert fields(errs) == [F + Key.THRESHOLD]
    assert "strict majority of the 4 shares" in errs[0].expected


def test_too_few_sites(honest: Round) -> None:
    errs = honest.check(Stage.SETUP, setup(n=2, m=2, t=2), setup_round_id=None)
    assert fields(errs) == [F + Key.SAMPLE_NUMBER, F + Key.SHARE_NUMBER]
    assert all("secagg_min_sites" in e.expected for e in errs)
    # ... and at share_keys: a setup for 3 sites, then keys for only two of them
    two = {k: v for k, v in honest.requests[Stage.SHARE_KEYS].items() if k != "33"}
    errs = check_secagg_request(ConfigRecord(two), honest.states[Stage.SHARE_KEYS], POLICY,
                                round_id="1", setup_round_id="1")
    assert fields(errs) == [F + "<node ids>"] and errs[0].got == "2"


def test_the_one_site_round_with_threshold_one(honest: Round) -> None:
    """Attack (a): a 1-of-1 Shamir share is the secret itself."""
    errs = honest.check(Stage.SETUP, setup(n=1, m=1, t=1), setup_round_id=None)
    assert set(fields(errs)) == {F + Key.SAMPLE_NUMBER, F + Key.SHARE_NUMBER,
                                 F + Key.THRESHOLD}


def test_more_shares_than_sites(honest: Round) -> None:
    errs = honest.check(Stage.SETUP, setup(n=3, m=5, t=3), setup_round_id=None)
    assert fields(errs) == [F + Key.SHARE_NUMBER] and "<= sample_num (3)" in errs[0].expected


def test_active_and_dropped_lists_overlap(honest: Round) -> None:
    """Attack (b): a node in both lists would have both its mask seed and its mask key
    rebuilt from the shares."""
    errs = honest.check(Stage.UNMASK, {Key.DEAD_NODE_ID_LIST: [22]})
    assert fields(errs) == [F + Key.DEAD_NODE_ID_LIST] and errs[0].got == "[22] in both lists"
    errs = honest.check(Stage.UNMASK, {Key.DEAD_NODE_ID_LIST: [SITE]})
    assert fields(errs) == [F + Key.DEAD_NODE_ID_LIST, F + Key.ACTIVE_NODE_ID_LIST]
    # listed only as dropped although it is answering: its own mask key would be shared
    errs = honest.check(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [22, 33],
                                       Key.DEAD_NODE_ID_LIST: [SITE]})
    assert fields(errs) == [F + Key.ACTIVE_NODE_ID_LIST]


def test_too_many_dropped(honest: Round) -> None:
    errs = honest.check(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [SITE],
                                       Key.DEAD_NODE_ID_LIST: [22, 33]})
    dropped = [e for e in errs if e.field == F + Key.DEAD_NODE_ID_LIST]
    assert len(dropped) == 1 and dropped[0].expected.startswith("at most 1 dropped")
    assert dropped[0].got == "2"


def test_a_node_this_site_never_shared_with(honest: Round) -> None:
    errs = honest.check(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [*NODES, 44]})
    assert fields(errs) == [F + Key.ACTIVE_NODE_ID_LIST] and errs[0].got == "[44]"
    errs = honest.check(Stage.UNMASK, {Key.DEAD_NODE_ID_LIST: [44]})
    assert F + Key.DEAD_NODE_ID_LIST in fields(errs)
    sources = honest.requests[Stage.COLLECT_MASKED_VECTORS][Key.SOURCE_LIST]
    assert isinstance(sources, list) and len(sources) == 2
    other = int(sources[1])
    errs = honest.check(Stage.COLLECT_MASKED_VECTORS, {Key.SOURCE_LIST: [44, other]})
    assert fields(errs) == [F + Key.SOURCE_LIST] and errs[0].got == "[44]"
    # its own shares never come back through the server
    errs = honest.check(Stage.COLLECT_MASKED_VECTORS, {Key.SOURCE_LIST: [SITE, other]})
    assert fields(errs) == [F + Key.SOURCE_LIST]


def test_parameters_changed_after_setup(honest: Round) -> None:
    # a later stage that restates a setup parameter must restate it unchanged
    errs = honest.check(Stage.COLLECT_MASKED_VECTORS, {Key.THRESHOLD: 1})
    assert fields(errs) == [F + Key.THRESHOLD] and "as set up for round '1'" in errs[0].expected
    assert honest.check(Stage.UNMASK, {Key.THRESHOLD: 2}) == []
    # a second setup of the same round may not change them (a new round may)
    state = honest.states[Stage.COLLECT_MASKED_VECTORS]
    second = ConfigRecord(setup(t=3))
    errs = check_secagg_request(second, state, POLICY, round_id="1", setup_round_id="1")
    assert fields(errs) == [F + Key.THRESHOLD]
    assert check_secagg_request(second, state, POLICY, round_id="2", setup_round_id="1") == []
    # more sites at share_keys than the setup said would share
    request = honest.requests[Stage.SHARE_KEYS] | {"44": [b"x" * 32, b"y" * 32]}
    errs = check_secagg_request(ConfigRecord(request), honest.states[Stage.SHARE_KEYS], POLICY,
                                round_id="1", setup_round_id="1")
    assert fields(errs) == [F + "<node ids>"] and "<= share_num (3)" in errs[0].expected
    # a stage of another round than the one set up
    errs = honest.check(Stage.SHARE_KEYS, round_id="2")
    assert fields(errs) == ["group_id"]


def test_stages_out_of_order_and_malformed_requests(honest: Round) -> None:
    after_share_keys = honest.states[Stage.COLLECT_MASKED_VECTORS]
    errs = check_secagg_request(ConfigRecord(honest.requests[Stage.UNMASK]), after_share_keys,
                                POLICY, round_id="1", setup_round_id="1")
    assert fields(errs) == [F + Key.STAGE] and "'collect_masked_vectors'" in errs[0].expected
    # nothing set up yet: only a setup is accepted
    errs = check_secagg_request(ConfigRecord(honest.requests[Stage.UNMASK]), ConfigRecord(),
                                POLICY)
    assert fields(errs) == [F + Key.STAGE]
    assert fields(honest.check(Stage.SETUP, {Key.STAGE: "bogus"}, setup_round_id=None)) == [
        F + Key.STAGE]
    errs = honest.check(Stage.SETUP, {Key.THRESHOLD: "2"}, setup_round_id=None)
    assert fields(errs) == [F + Key.THRESHOLD] and errs[0].got == "str"
    errs = honest.check(Stage.SETUP, {Key.MAX_WEIGHT: 0.0}, setup_round_id=None)
    assert fields(errs) == [F + Key.MAX_WEIGHT]
    errs = honest.check(Stage.UNMASK, {Key.DEAD_NODE_ID_LIST: "22"})
    assert fields(errs) == [F + Key.ACTIVE_NODE_ID_LIST]
