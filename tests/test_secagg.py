"""SecAgg+ through the real ServerApp and ClientApp code (an in-process transport):

* no reply the server receives holds a readable update, yet the aggregate equals plain
  FedAvg of the same local models within the quantisation error;
* a site that drops out after the key exchange is unmasked from its neighbours' shares;
* in plain mode a NaN update and a wrong-shaped update are dropped while the round completes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedpacs.client.app import app as client_app
from fedpacs.client.config import load_site_config
from fedpacs.client.trainer import train_round
from fedpacs.common import wire
from fedpacs.common.artifacts import load_model
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.models import build_model
from fedpacs.server.app import run_federation
from tests.loopback import LoopbackGrid

TASK = "breastmnist"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _sites(tmp_path: Path, data_dir: Path, n: int = 3) -> dict[int, Path]:
    out = {}
    for i in range(n):
        p = tmp_path / f"site{i}.toml"
        p.write_text(f'[site]\nname = "site-{i}"\ntask = "{TASK}"\n[data]\nformat = "medmnist"\n'
                     f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\npartition = {i}\n'
                     f"num_partitions = {n}\n[compute]\nthreads = 1\n")
        out[i + 1] = p
    return out


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
        out[nid] = (wire.arrays_to_numpy(reply.array_records[wire.ARRAYS_KEY]), n)
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

    replies = _train_replies(grid)
    assert len(replies) == 3 * 4  # 4 SecAgg+ stages, 3 sites
    for r in replies:  # no reply carries weights in the clear
        assert all(len(rec) == 0 for rec in r.content.array_records.values())
    masked = [r for r in replies if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    for r in masked:
        weights, n = local[r.metadata.src_node_id]
        vec = _masked_vector(r)
        true = np.concatenate([np.asarray(v, np.float64).ravel() for v in weights.values()])
        got = np.concatenate([v.astype(np.float64).ravel() for v in vec[1:]])  # [0]: weight
        assert got.size == true.size
        # uniformly spread over [0, 2**32): uncorrelated with the site's weights
        assert abs(np.corrcoef(got, true)[0, 1]) < 0.05
        assert got.std() > 1e8


def _masked_vector(reply: Message) -> list[np.ndarray]:
    from flwr.common import bytes_to_ndarray

    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    assert isinstance(blobs, list)
    return [bytes_to_ndarray(b) for b in blobs if isinstance(b, bytes)]


def test_a_site_that_drops_after_the_key_exchange_is_unmasked_from_shares(
        tmp_path: Path, data_dir: Path) -> None:
    sites = _sites(tmp_path, data_dir)
    cfg = _cfg(tmp_path)

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


def test_bad_updates_are_dropped_and_the_round_completes(
        tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sites = _sites(tmp_path, data_dir)
    for p in sites.values():  # plain mode: the sites must agree to it
        p.write_text(p.read_text() + "[security]\nrequire_secagg = false\n")
    cfg = _cfg(tmp_path, secagg=False)
    first_key = next(iter(build_model(cfg.task_config()).state_dict()))

    def faulty(nid: int, reply: Message) -> None:
        if reply.metadata.message_type != "train":
            return
        arrays = reply.content.array_records[wire.ARRAYS_KEY]
        values = wire.arrays_to_numpy(arrays)
        if nid == 2:
            values[first_key] = np.full_like(values[first_key], np.nan)
        elif nid == 3:
            values[first_key] = np.zeros((3, 3), dtype=np.float32)
        else:
            return
        reply.content[wire.ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in values.items()})

    grid = LoopbackGrid(client_app, sites, tamper=faulty)
    with caplog.at_level(logging.ERROR, logger="fedpacs.server"):
        run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    local = _local_models(cfg, sites)
    assert _max_diff(_final_state(cfg), local[1][0]) < 1e-5  # only site-0's update is used
    rec = json.loads((Path(cfg.run_dir) / "rounds" / "round-001" / "metrics.json").read_text())
    assert set(rec["rejected"]) == {"site-1", "site-2"}
    assert "NaN" in rec["rejected"]["site-1"] and first_key in rec["rejected"]["site-1"]
    assert ".shape" in rec["rejected"]["site-2"]
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
