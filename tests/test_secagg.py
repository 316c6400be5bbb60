"""SecAgg+ through the real ServerApp and ClientApp code (an in-process transport):

* no reply the server receives holds a readable update, yet the aggregate equals plain
  FedAvg of the same local models within the quantisation error;
* a site that drops out after the key exchange is unmasked from its neighbours' shares;
* in plain mode a NaN update and a wrong-shaped update are dropped while the round completes;
* a malicious server that picks the SecAgg+ parameters (a one-site round with threshold 1)
  or lists a site as both active and dropped gets a coded refusal and nothing of the
  site's update, where Flower's ``secaggplus_mod`` alone hands it the exact update.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedpacs.client.app import app as client_app
from fedpacs.client.app import train as site_train
from fedpacs.client.config import load_site_config
from fedpacs.client.trainer import train_round
from fedpacs.common import wire
from fedpacs.common.artifacts import load_model
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import ExitCode, describe
from fedpacs.common.models import build_model
from fedpacs.server.app import run_federation
from fedpacs.server.grid import secagg_stage
from fedpacs.server.secure import MODULUS_RANGE, QUANTIZATION_RANGE
from tests.loopback import LoopbackGrid, breastmnist_sites, send_stage

pytestmark = pytest.mark.usefixtures("task_identity")

TASK = "breastmnist"




def _sites(tmp_path: Path, data_dir: Path, n: int = 3) -> dict[int, Path]:
    return breastmnist_sites(tmp_path, data_dir, n=n)


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    base: dict[str, object] = {"task": TASK, "rounds": 1, "local_epochs": 1, "batch_size": 32,
                               "min_sites": 3, "round_timeout_s": 60.0, "cross_site": False,
                               "run_dir": str(tmp_path / "run")}
    return RunConfig(**(base | kw))  # type: ignore[arg-type,unused-ignore]


Local = dict[int, tuple[dict[str, np.ndarray], int]]


def _local_models(cfg: RunConfig, sites: dict[int, Path]) -> Local:
    """Each site's round-1 model trained directly (no federation), with its sample count."""
    model = build_model(cfg.task_config(), seed=cfg.seed)
    content = RecordDict({wire.ARRAYS_KEY: wire.model_to_arrays(model),
                          wire.CONFIG_KEY: RoundInstructions.for_round(cfg, 1).to_record()})
    out = {}
    for nid, path in sites.items():
        reply = train_round(load_site_config(path), content, RecordDict())
        n = int(reply.metric_records[wire.METRICS_KEY][wire.NUM_EXAMPLES])  # type: ignore[arg-type,unused-ignore]
        out[nid] = (wire.arrays_to_numpy(reply.array_records[wire.ARRAYS_KEY],
                                         model.state_dict()), n)
    return out


def _fedavg(models: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in models)
    return {k: np.sum([m[k].astype(np.float64) * n for m, n in models], axis=0) / total
            for k in models[0][0]}


def _final_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    model, _ = load_model(Path(cfg.run_dir) / "final" / "model.pt")
    return model.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].double().numpy() - b[k]))) for k in b
               if a[k].is_floating_point())


def _train_replies(grid: LoopbackGrid) -> list[Message]:
    return [m for m in grid.received if m.metadata.message_type == "train"]


def test_server_sees_only_masked_vectors_and_the_aggregate_is_fedavg(
        tmp_path: Path, data_dir: Path) -> None:
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path)
    grid = LoopbackGrid(client_app, sites)
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))

    local = _local_models(cfg, sites)
    expected = _fedavg(list(local.values()))
    final = _final_state(cfg)
    assert _max_diff(final, expected) < 2e-3  # quantisation: 2*clip/2**24 per weighted step
    # ... and it is the mean, not any one site's model
    for weights, _ in local.values():
        assert _max_diff(final, weights) > 1e-2
    # BatchNorm's batch counters (they grow each round, and soon would not fit the clip
    # range) travel as 0 under SecAgg+; each site's own model counted its batches
    counters = [k for k, v in final.items() if not v.is_floating_point()]
    assert counters and all(int(final[k]) == 0 for k in counters)
    assert all(float(weights[k]) > 0 for weights, _ in local.values() for k in counters)

    replies = _train_replies(grid)
    assert len(replies) == 3 * 4  # 4 SecAgg+ stages, 3 sites
    for r in replies:  # no reply carries weights in the clear
        assert all(len(rec) == 0 for rec in r.content.array_records.values())
    masked = [r for r in replies if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    # a round is the four SecAgg+ exchanges, no evaluate exchange; then one for the final
    # model (cross-site validation is off here)
    assert [(secagg_stage(p[0].content), len(p)) for p in grid.pushes] == [
        (Stage.SETUP, 3), (Stage.SHARE_KEYS, 3), (Stage.COLLECT_MASKED_VECTORS, 3),
        (Stage.UNMASK, 3), ("", 3)]
    assert grid.pushes[-1][0].metadata.message_type == "evaluate"
    # the sites' evaluation of the initial model and their timing came in the clear beside
    # the masked vectors, and reached the record
    for r in masked:
        clear = r.content.config_records["fitres.metrics"]
        t_train = clear["t-train"]
        assert clear["val-num-examples"] == 26 and "val-auc" in clear
        assert isinstance(t_train, float) and t_train > 0
    rounds = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rounds"]
    names = {"site-0", "site-1", "site-2"}
    for rec in rounds:
        assert set(rec["evaluate_sites"]) == names
        assert set(rec["evaluate_sites"]["site-0"]) == {"num-examples", "fedbn-restored",
                                                        "val-accuracy", "val-auc", "val-loss",
                                                        "val-sensitivity", "val-specificity"}
    timing = rounds[1]["timing"]
    assert [e["stage"] for e in timing["exchanges"]] == [
        Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK]
    assert set(timing["sites"]) == names and timing["slowest_site"] in names
    assert 0 < timing["slowest_train_s"] == timing["site_max"]["t-train"] <= timing["round_s"]
    assert timing["overhead_s"] >= 0 and 0 <= timing["overhead_fraction"] < 1
    assert set(rounds[1]["train_sites"]["site-0"]) == {"num-examples", "train-loss",
                                                       "train-seconds"}
    for r in masked:
        weights, n = local[r.metadata.src_node_id]
        vec = _masked_vector(r)
        true = np.concatenate([np.asarray(v, np.float64).ravel() for v in weights.values()])
        got = np.concatenate([v.astype(np.float64).ravel() for v in vec[1:]])  # [0]: weight
        assert got.size == true.size
        # uniformly spread over [0, 2**32): uncorrelated with the site's weights
        assert abs(np.corrcoef(got, true)[0, 1]) < 0.05
        assert got.std() > 1e8


def test_a_secagg_run_repeats_bit_for_bit(tmp_path: Path, data_dir: Path) -> None:
    """Each site draws its stochastic rounding from a seed of its own update: the same
    run twice gives the same global model, to the bit (the masks differ, and cancel), and
    the site's numpy generator is left as it was."""
    sites = _sites(tmp_path, data_dir)
    hashes, masked = [], []
    for seed in (1, 2):  # (whatever state numpy's global generator is in)
        cfg = _cfg(tmp_path, rounds=2, run_dir=str(tmp_path / f"run-{seed}"))
        grid = LoopbackGrid(client_app, sites)
        np.random.seed(seed)
        run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
        assert np.random.randint(2**31) == np.random.RandomState(seed).randint(2**31)
        hashes.append([r["weights_sha256"] for r in
                       json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rounds"]])
        masked.append([_masked_vector(r)[1] for r in _train_replies(grid)
                       if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]])
    assert hashes[0] == hashes[1] and len(set(hashes[0])) == 3
    assert not any(np.array_equal(a, b) for a, b in zip(*masked, strict=True))


def _masked_vector(reply: Message) -> list[np.ndarray]:
    from flwr.common import bytes_to_ndarray

    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    assert isinstance(blobs, list)
    return [bytes_to_ndarray(b) for b in blobs if isinstance(b, bytes)]


def test_a_site_that_drops_after_the_key_exchange_is_unmasked_from_shares(
        tmp_path: Path, data_dir: Path) -> None:
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path, round_timeout_s=3.0)  # the server waits that long for site 3

    def lost(nid: int, msg: Message) -> bool:  # site 3 dies before sending its vector
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord()).get(Key.STAGE)
        return nid == 3 and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)

    grid = LoopbackGrid(client_app, sites, drop=lost)
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    local = _local_models(cfg, sites)
    expected = _fedavg([local[1], local[2]])
    assert _max_diff(_final_state(cfg), expected) < 2e-3
    rec = json.loads((Path(cfg.run_dir) / "rounds" / "round-001" / "metrics.json").read_text())
    assert rec["secagg"] == {"sites_summed": 2, "sites_dropped": 1}
    assert set(rec["train_sites"]) == {"site-0", "site-1"}


def test_a_site_lost_during_the_key_exchange_leaves_the_round_to_the_others(
        tmp_path: Path, data_dir: Path) -> None:
    """A site whose link goes as the round starts answers the setup stage but never sends
    its key shares. Flower's workflow alone then halts the round at unmasking (it asks the
    others for shares that were never handed out); fedpacs' goes on with the three sites
    that finished the key exchange, and their sum is exactly their FedAvg."""
    sites = _sites(tmp_path, data_dir, n=4)
    cfg = _cfg(tmp_path, round_timeout_s=3.0)

    def lost(nid: int, msg: Message) -> bool:
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord()).get(Key.STAGE)
        return nid == 4 and stage != Stage.SETUP

    run_federation(LoopbackGrid(client_app, sites, drop=lost), cfg,
                   Context(1, 0, {}, RecordDict(), {}))
    local = _local_models(cfg, {k: v for k, v in sites.items() if k != 4})
    assert _max_diff(_final_state(cfg), _fedavg([local[1], local[2], local[3]])) < 2e-3
    rec = json.loads((Path(cfg.run_dir) / "rounds" / "round-001" / "metrics.json").read_text())
    assert rec["secagg"]["sites_summed"] == 3
    assert set(rec["train_sites"]) == {"site-0", "site-1", "site-2"}


def test_bad_updates_are_dropped_and_the_round_completes(
        tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sites = _sites(tmp_path, data_dir)
    for p in sites.values():  # plain mode: the sites must agree to it
        p.write_text(p.read_text() + "[security]\nrequire_secagg = false\n")
    cfg = _cfg(tmp_path, secagg=False)
    reference = build_model(cfg.task_config()).state_dict()
    first_key = next(iter(reference))
    size = sum(v.numel() for v in reference.values())

    def faulty(nid: int, reply: Message) -> None:  # each attack in the packed form sites send
        if reply.metadata.message_type != "train":
            return
        arrays = reply.content.array_records[wire.ARRAYS_KEY]
        assert wire.is_packed(arrays)
        flat = arrays[wire.PACKED_KEY].numpy().copy()
        if nid == 2:  # NaN over the first entry's span of the vector
            flat[:reference[first_key].numel()] = np.nan
        elif nid == 3:  # one value short: no layout of this model fits it
            flat = flat[:-1]
        else:
            return
        reply.content[wire.ARRAYS_KEY] = ArrayRecord({wire.PACKED_KEY: Array(flat)})

    grid = LoopbackGrid(client_app, sites, tamper=faulty)
    with caplog.at_level(logging.ERROR, logger="fedpacs.server"):
        run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    local = _local_models(cfg, sites)
    assert _max_diff(_final_state(cfg), local[1][0]) < 1e-5  # only site-0's update is used
    rec = json.loads((Path(cfg.run_dir) / "rounds" / "round-001" / "metrics.json").read_text())
    assert set(rec["rejected"]) == {"site-1", "site-2"}
    assert "NaN" in rec["rejected"]["site-1"] and first_key in rec["rejected"]["site-1"]
    assert f"one floating vector of {size} values" in rec["rejected"]["site-2"]
    assert f"float32 of shape ({size - 1},)" in rec["rejected"]["site-2"]
    assert "update from site-1 dropped" in caplog.text
    assert "update from site-2 dropped" in caplog.text


def test_local_dp_under_secagg_bounds_the_step(tmp_path: Path, data_dir: Path) -> None:
    """Each site clips its update to dp-clip before masking, so the mean update of the
    round is within dp-clip of the initial model (noise made negligible by a huge epsilon)."""
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path, dp_clip=0.5, dp_epsilon=1e6)
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    start = build_model(cfg.task_config(), seed=cfg.seed).state_dict()
    final = _final_state(cfg)
    step = float(np.sqrt(sum(float(torch.sum((final[k].double() - start[k].double()) ** 2))
                             for k in start if start[k].is_floating_point())))
    assert 0.05 < step <= 0.5 + 1e-3
    card = json.loads((Path(cfg.run_dir) / "final" / "model_card.json").read_text())
    assert card["local_dp"]["clip"] == 0.5 and card["secure_aggregation"] == "SecAgg+"


def test_serverapp_refuses_a_run_without_its_run_dir() -> None:
    """No made-up folder in the ServerApp's cwd: a run config without run-dir is a coded
    error naming the field."""
    from fedpacs.common.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        run_federation(LoopbackGrid(client_app, {}), RunConfig(secagg=False),
                       Context(1, 0, {}, RecordDict(), {}))
    assert [e.field for e in exc.value.errors] == ["run-dir"]


# --- a malicious coordinator -----------------------------------------------------------------

Lists = tuple[list[int], list[int]]  # an unmask request: (active, dropped) node ids


def _flower_only() -> ClientApp:
    """The site without its own SecAgg+ policy: Flower's ``secaggplus_mod`` alone in front
    of fedpacs' training, answering whatever the server asks (the control that shows each
    attack is real)."""
    bare = ClientApp(mods=[secaggplus_mod])
    bare.train()(site_train)
    return bare


def _record(values: dict[str, ConfigRecordValues], content: RecordDict | None = None
            ) -> RecordDict:
    out = content if content is not None else RecordDict()
    out.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(values)
    return out


def _values(reply: Message, key: str) -> list[ConfigRecordValues]:
    value = reply.content.config_records[RECORD_KEY_CONFIGS][key]
    return list(value) if isinstance(value, list) else [value]


class RogueServer:
    """A coordinator that runs the SecAgg+ stages with parameters of its choosing, over the
    loopback grid to the sites' ClientApp, pressing on past refusals; then tries to unmask
    one site's update from what the sites sent it."""

    def __init__(self, grid: LoopbackGrid, cfg: RunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.replies: dict[str, dict[int, Message]] = {}
        self.setup_params: dict[str, ConfigRecordValues] = {}
        self.pk1: dict[int, bytes] = {}
        self.sources: dict[int, list[int]] = {}
        self.asked: dict[int, Lists] = {}

    def ok(self, stage: str) -> dict[int, Message]:
        return {nid: r for nid, r in self.replies.get(stage, {}).items() if not r.has_error()}

    def until_unmask(self, nodes: list[int], *, n: int, m: int, t: int) -> None:
        self.setup_params = {
            Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: m, Key.THRESHOLD: t,
            Key.CLIPPING_RANGE: self.cfg.secagg_clip, Key.TARGET_RANGE: QUANTIZATION_RANGE,
            Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: self.cfg.secagg_max_weight}
        self.replies[Stage.SETUP] = send_stage(self.grid, {nid: _record(
            {Key.STAGE: Stage.SETUP} | self.setup_params) for nid in nodes})
        pks: dict[str, ConfigRecordValues] = {}
        for nid in nodes:  # a refusing site gets made-up keys: the server presses on
            reply = self.ok(Stage.SETUP).get(nid)
            pk1, pk2 = ((_values(reply, Key.PUBLIC_KEY_1)[0], _values(reply, Key.PUBLIC_KEY_2)[0])
                        if reply else (bytes([nid]) * 32, bytes([nid + 1]) * 32))
            assert isinstance(pk1, bytes) and isinstance(pk2, bytes)
            self.pk1[nid], pks[str(nid)] = pk1, [pk1, pk2]
        self.replies[Stage.SHARE_KEYS] = send_stage(self.grid, {nid: _record(
            {Key.STAGE: Stage.SHARE_KEYS} | pks) for nid in nodes})
        fwd: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in nodes}
        for src, reply in self.ok(Stage.SHARE_KEYS).items():
            for dst, ct in zip(_values(reply, Key.DESTINATION_LIST),
                               _values(reply, Key.CIPHERTEXT_LIST), strict=True):
                assert isinstance(dst, int) and isinstance(ct, bytes)
                fwd[dst][0].append(src)
                fwd[dst][1].append(ct)
        self.sources = {nid: fwd[nid][0] for nid in nodes}
        self.replies[Stage.COLLECT_MASKED_VECTORS] = send_stage(self.grid, {nid: _record(
            {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: fwd[nid][0],
             Key.CIPHERTEXT_LIST: fwd[nid][1]}, self._fitins()) for nid in nodes})

    def unmask(self, lists: dict[int, Lists]) -> dict[int, Message]:
        self.asked = lists
        self.replies[Stage.UNMASK] = send_stage(self.grid, {nid: _record(
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
             Key.DEAD_NODE_ID_LIST: dead}) for nid, (active, dead) in lists.items()})
        return self.replies[Stage.UNMASK]

    def _fitins(self) -> RecordDict:
        model = build_model(self.cfg.task_config(), seed=self.cfg.seed)
        params = ndarrays_to_parameters(wire.to_numpy_list(wire.model_to_arrays(model)))
        ins = FitIns(params, RoundInstructions.for_round(self.cfg, 1).to_dict())
        return compat.fitins_to_recorddict(ins, keep_input=True)

    def recover(self, victim: int) -> np.ndarray | None:
        """The victim's own update, unmasked with the shares the sites handed over (as the
        server would: its mask seed, then each pairwise mask from either end's key); None
        when the shares are too few."""
        masked = self.ok(Stage.COLLECT_MASKED_VECTORS).get(victim)
        if masked is None:
            return None
        t, mod = self.setup_params[Key.THRESHOLD], self.setup_params[Key.MOD_RANGE]
        assert isinstance(t, int) and isinstance(mod, int)
        seeds: dict[int, list[bytes]] = {}
        keys: dict[int, list[bytes]] = {}
        for holder, reply in self.ok(Stage.UNMASK).items():
            active, dead = self.asked[holder]
            shares = _values(reply, Key.SHARE_LIST)
            for i, (owner, share) in enumerate(zip(active + dead, shares, strict=True)):
                assert isinstance(share, bytes)  # first the seed shares, then the key shares
                (seeds if i < len(active) else keys).setdefault(owner, []).append(share)
        if len(seeds.get(victim, [])) < t:
            return None
        vec = [np.asarray(a) for a in _masked_vector(masked)]
        shapes = [a.shape for a in vec]
        vec = parameters_subtraction(vec, pseudo_rand_gen(
            combine_shares(seeds[victim]), mod, shapes))
        for peer in self.sources[victim]:  # pairwise masks: from either end's mask key
            if len(keys.get(victim, [])) >= t:
                secret, public = combine_shares(keys[victim]), self.pk1[peer]
            elif len(keys.get(peer, [])) >= t:
                secret, public = combine_shares(keys[peer]), self.pk1[victim]
            else:
                return None
            mask = pseudo_rand_gen(generate_shared_key(
                bytes_to_private_key(secret), bytes_to_public_key(public)), mod, shapes)
            vec = (parameters_subtraction if victim > peer else parameters_addition)(vec, mask)
        q_ratio, quantized = factor_extract(parameters_mod(vec, mod))
        clip, target = float(self.cfg.secagg_clip), QUANTIZATION_RANGE
        values = dequantize(quantized, clip, target)
        return np.concatenate([v.ravel() * target / q_ratio for v in values])


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    """A site's model as its SecAgg+ reply carries it: one vector, the batch counters 0."""
    return np.concatenate([np.asarray(0 * v if k.endswith("num_batches_tracked") else v,
                                      np.float64).ravel() for k, v in weights.items()])


def _secrets(grid: LoopbackGrid, victim: int) -> set[bytes]:
    """The victim's mask seed and mask keys, and every share of them any site holds."""
    out: set[bytes] = set()
    for nid, ctx in grid.contexts.items():
        state = ctx.state.config_records.get(RECORD_KEY_STATE, ConfigRecord())
        if nid == victim:
            out |= {v for k in ("rd_seed", "sk1", "sk2") if isinstance(v := state.get(k), bytes)}
        for kind in ("rd_seed_share_dict", "sk1_share_dict"):
            owners, shares = state.get(f"{kind}:K", []), state.get(f"{kind}:V", [])
            assert isinstance(owners, list) and isinstance(shares, list)
            out |= {s for o, s in zip(owners, shares, strict=True)
                    if o == victim and isinstance(s, bytes)}
    return out


def _leaked(replies: list[Message], secrets: set[bytes]) -> list[bytes]:
    """The secrets found (whole or inside any byte string) in what the server received."""
    blobs = [b for r in replies if r.has_content()
             for rec in r.content.config_records.values() for v in rec.values()
             for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes)]
    return [s for s in secrets if any(s in b for b in blobs)]


def _assert_refused(reply: Message) -> None:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ExitCode.POLICY
    assert reply.error.reason == f"FP010 PolicyError: {describe(ExitCode.POLICY)}"


def test_a_one_site_round_with_threshold_one_gets_nothing(
        tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attack (a): sample_num = share_num = threshold = 1 with only the victim; its single
    Shamir share is its mask seed."""
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path)
    victim = 1
    alone = {victim: sites[victim]}
    # control: Flower's mod alone hands the server the victim's exact update
    rogue = RogueServer(LoopbackGrid(_flower_only(), alone), cfg)
    rogue.until_unmask([victim], n=1, m=1, t=1)
    rogue.unmask({victim: ([victim], [])})
    recovered = rogue.recover(victim)
    truth = _flat(_local_models(cfg, alone)[victim][0])
    assert recovered is not None and np.max(np.abs(recovered - truth)) < 1e-3

    # fedpacs: refused at setup, and every later stage gets nothing either
    grid = LoopbackGrid(client_app, alone)
    rogue = RogueServer(grid, cfg)
    with caplog.at_level(logging.ERROR, logger="fedpacs.site"):
        rogue.until_unmask([victim], n=1, m=1, t=1)
        rogue.unmask({victim: ([victim], [])})
    assert set(rogue.replies) == set(Stage.all())
    for replies in rogue.replies.values():
        _assert_refused(replies[victim])  # no public keys, no shares, no masked vector
    assert not any(r.has_content() for r in grid.received)
    assert rogue.recover(victim) is None
    assert RECORD_KEY_STATE not in grid.contexts[victim].state.config_records  # nothing held
    # the reasons stay in the site's log
    assert "secaggplus_configs.sample_num: expected >= 3 sites" in caplog.text
    assert "secaggplus_configs.threshold: expected >= 2 (this site's secagg_min_threshold)" \
        in caplog.text
    assert "'collect_masked_vectors' request from the server refused" in caplog.text


def test_a_site_listed_as_active_and_dropped_gives_no_share(
        tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attack (b): an honest 3-site round up to the masked vectors, then each site is asked
    for the victim's mask-seed share (active) and its mask-key share (dropped)."""
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path)
    victim, nodes = 1, sorted(sites)
    both = {nid: (list(nodes), [victim]) for nid in nodes}
    # control: Flower's mod alone answers, the shares rebuild both secrets, the update shows
    grid = LoopbackGrid(_flower_only(), sites)
    rogue = RogueServer(grid, cfg)
    rogue.until_unmask(nodes, n=3, m=3, t=2)
    secrets = _secrets(grid, victim)
    rogue.unmask(both)
    recovered = rogue.recover(victim)
    truth = _flat(_local_models(cfg, {victim: sites[victim]})[victim][0])
    assert recovered is not None and np.max(np.abs(recovered - truth)) < 1e-3
    assert _leaked(grid.received, secrets)  # the scan below sees shares when they are sent

    # fedpacs: the honest stages go through, the unmask request is refused by every site
    grid = LoopbackGrid(client_app, sites)
    rogue = RogueServer(grid, cfg)
    rogue.until_unmask(nodes, n=3, m=3, t=2)
    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS):
        assert set(rogue.ok(stage)) == set(nodes)
    secrets = _secrets(grid, victim)
    assert len(secrets) == 3 + 2 * 3  # rd_seed, sk1, sk2; each site's share of two of them
    with caplog.at_level(logging.ERROR, logger="fedpacs.site"):
        replies = rogue.unmask(both)
    for nid in nodes:
        _assert_refused(replies[nid])
    assert rogue.recover(victim) is None  # not one share of anything
    assert _leaked(grid.received, secrets) == []
    assert "dead_nids: expected no node also listed as active" in caplog.text
    assert "got [1] in both lists" in caplog.text
    # the masked vector the server holds is noise without the shares
    masked = np.concatenate([v.astype(np.float64).ravel() for v in _masked_vector(
        rogue.ok(Stage.COLLECT_MASKED_VECTORS)[victim])[1:]])
    assert abs(np.corrcoef(masked, truth)[0, 1]) < 0.05
    # the sites forgot the round's secrets: asking again, honestly now, gets nothing either
    assert all(RECORD_KEY_STATE not in c.state.config_records for c in grid.contexts.values())
    for reply in rogue.unmask({nid: (list(nodes), []) for nid in nodes}).values():
        _assert_refused(reply)
    assert rogue.recover(victim) is None


def test_split_views_are_stopped_by_the_majority_threshold(
        tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Why the threshold must be a strict majority: with 2 of 4 the server can tell each
    site a different story, each one well-formed (the site itself active, the lists
    disjoint, at most n - t dropped), and still collect the victim's mask seed and a mask
    key for every pairwise mask."""
    from fedpacs.client.config import SecurityConfig
    from fedpacs.client.secagg_policy import check_secagg_request

    sites = _sites(tmp_path, data_dir, n=4)
    cfg = _cfg(tmp_path, min_sites=4)
    victim, nodes = 1, sorted(sites)
    views = {1: ([1, 4], [2, 3]), 2: ([2, 1], [3, 4]), 3: ([3, 1], [2, 4])}
    grid = LoopbackGrid(_flower_only(), sites)
    rogue = RogueServer(grid, cfg)
    rogue.until_unmask(nodes, n=4, m=4, t=2)
    for nid, (active, dead) in views.items():  # each view alone passes the unmask rules
        request = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                                Key.DEAD_NODE_ID_LIST: dead})
        state = grid.contexts[nid].state.config_records[RECORD_KEY_STATE]
        assert check_secagg_request(request, state, SecurityConfig(), round_id="1",
                                    setup_round_id="1") == []
    rogue.unmask(views)
    recovered = rogue.recover(victim)
    truth = _flat(_local_models(cfg, {victim: sites[victim]})[victim][0])
    assert recovered is not None and np.max(np.abs(recovered - truth)) < 1e-3

    # fedpacs: 2 of 4 is no majority, so the round is refused at setup
    grid = LoopbackGrid(client_app, sites)
    rogue = RogueServer(grid, cfg)
    with caplog.at_level(logging.ERROR, logger="fedpacs.site"):
        rogue.until_unmask(nodes, n=4, m=4, t=2)
    for nid in nodes:
        _assert_refused(rogue.replies[Stage.SETUP][nid])
    assert "expected a strict majority of the 4 shares (> 2), got 2" in caplog.text
    # with 3 of 4 the same stories break the site's rules (at most 1 dropped) and get nothing
    rogue = RogueServer(LoopbackGrid(client_app, sites), cfg)
    rogue.until_unmask(nodes, n=4, m=4, t=3)
    assert set(rogue.ok(Stage.COLLECT_MASKED_VECTORS)) == set(nodes)
    for reply in rogue.unmask(views).values():
        _assert_refused(reply)
    assert rogue.recover(victim) is None
