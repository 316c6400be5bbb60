"""The recipe in a federated run (real ServerApp and ClientApps over LoopbackGrid):
round 0 starts from the --init-model's weights (its record's weights hash equals the
source's), frozen-feature runs change only the network's head, `run start` refuses a
source whose layers do not match before anything is submitted, and an uncertainty method
reports per-case held-out uncertainty next to the metric (signed with the run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpacs.client.app import app as client_app
from fedpacs.common import wire
from fedpacs.common.artifacts import read_model_file
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import build_model
from fedpacs.common.signing import HELDOUT_CASES_FILE, artifact_paths
from fedpacs.common.tasks import task_with_network
from fedpacs.common.transfer import head_keys, weights_sha256
from fedpacs.server.app import run_federation
from fedpacs.server.rundir import read_rounds, round_folder
from tests.loopback import LoopbackGrid, breastmnist_sites

pytestmark = pytest.mark.usefixtures("task_identity")


def _source(tmp_path: Path, seed: int = 7) -> tuple[Path, str]:
    """A state dict of the run's network, other than its seeded start (a pretrained
    model stands in: any weights that fit)."""
    model = build_model(task_with_network("breastmnist", ""), seed=seed)
    path = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), path)
    return path, weights_sha256(model.state_dict())


def _run(tmp_path: Path, data_dir: Path, name: str, **kw: Any) -> Path:
    sites = breastmnist_sites(tmp_path, data_dir, num_partitions=12,
                              security="require_secagg = false\n")
    cfg = RunConfig(**({"task": "breastmnist", "rounds": 2, "local_epochs": 1,
                        "batch_size": 64, "min_sites": 3, "round_timeout_s": 60.0,
                        "cross_site": False, "secagg": False, "lr": 0.01,
                        "run_dir": str(tmp_path / name), "run_name": name} | kw))
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    return tmp_path / name


def _round_state(run_dir: Path, n: int) -> dict[str, torch.Tensor]:
    return dict(read_model_file(round_folder(run_dir, n) / "model.pt")["state_dict"])


def test_round_zero_is_the_init_model_and_frozen_features_stay(tmp_path: Path,
                                                              data_dir: Path) -> None:
    source, digest = _source(tmp_path)
    run_dir = _run(tmp_path, data_dir, "frozen", init_model=str(source), freeze="features")
    rounds = read_rounds(run_dir)
    assert rounds[0]["weights_sha256"] == digest  # the record says so ...
    assert weights_sha256(_round_state(run_dir, 0)) == digest  # ... and the checkpoint is it
    assert rounds[0]["init_model"] == "file: pretrained.pt"
    seeded = build_model(task_with_network("breastmnist", ""), seed=0).state_dict()
    assert weights_sha256(seeded) != digest  # not the network's own seeded start
    # frozen features: only the head moved (FedAvg of equal tensors up to rounding)
    start, end = _round_state(run_dir, 0), _round_state(run_dir, 2)
    head = head_keys(build_model(task_with_network("breastmnist", "")), "resnet18")
    moved = {k for k in start if not torch.allclose(start[k].float(), end[k].float(),
                                                    rtol=1e-5, atol=1e-6)}
    assert moved and moved <= head, sorted(moved - head)[:5]


def test_fine_tuning_moves_the_features_too(tmp_path: Path, data_dir: Path) -> None:
    source, digest = _source(tmp_path)
    run_dir = _run(tmp_path, data_dir, "tuned", init_model=str(source), rounds=1)
    assert read_rounds(run_dir)[0]["weights_sha256"] == digest
    start, end = _round_state(run_dir, 0), _round_state(run_dir, 1)
    head = head_keys(build_model(task_with_network("breastmnist", "")), "resnet18")
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved - head  # the feature extractor trained as well
    assert json.loads((run_dir / "metrics.json").read_text())["rounds"][1]["lr"] == 0.01


def test_a_plain_run_sends_each_round_its_scheduled_learning_rate(tmp_path: Path,
                                                                 data_dir: Path) -> None:
    """Warm-up then cosine over 3 plain rounds: each round's train messages carry that
    round's rate, the one metrics.json records (Flower's loop would send round 1's
    instructions every round)."""
    from fedpacs.common.contract import RoundInstructions
    from fedpacs.common.recipe import round_lr

    sites = breastmnist_sites(tmp_path, data_dir, num_partitions=12,
                              security="require_secagg = false\n")
    cfg = RunConfig(task="breastmnist", rounds=3, local_epochs=1, batch_size=64, min_sites=3,
                    round_timeout_s=60.0, cross_site=False, secagg=False, lr=0.01,
                    warmup_rounds=1, lr_schedule="cosine", run_dir=str(tmp_path / "sched"))
    grid = LoopbackGrid(client_app, sites)
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    sent = {}
    for batch in grid.pushes:
        for m in batch:
            if m.metadata.message_type == "train":
                ins = RoundInstructions.from_record(m.content.config_records[wire.CONFIG_KEY])
                sent.setdefault(ins.server_round, set()).add(ins.lr)
    want = {r: round_lr(0.01, r, 3, cfg.recipe()) for r in (1, 2, 3)}
    assert want[1] == pytest.approx(0.005) and want[2] == pytest.approx(0.01)
    assert want[3] == pytest.approx(0.005)
    assert sent == {r: {lr} for r, lr in want.items()}
    assert [r["lr"] for r in read_rounds(tmp_path / "sched")[1:]] == list(want.values())


def test_run_start_refuses_an_init_model_of_another_shape(tmp_path: Path) -> None:
    """Checked before anything starts: the run is never submitted (no Control needed)."""
    from fedpacs.server.coordinator.control import start_run

    wrong = build_model(task_with_network("breastmnist", "resnet34"))
    path = tmp_path / "resnet34.pt"
    torch.save(wrong.state_dict(), path)

    class NoControl:
        def submit(self, app_dir: Path) -> int:
            raise AssertionError("submitted a run whose init model does not fit")

    with pytest.raises(ConfigError) as err:
        start_run(control=NoControl(), cfg=RunConfig(task="breastmnist",  # type: ignore[arg-type]
                                                     init_model=str(path)),
                  runs_dir=tmp_path / "runs", apps_dir=tmp_path / "apps",
                  app_key=tmp_path / "none.key", artifact_key=None)
    text = str(err.value)
    assert "init-model" in text and "layer1" in text  # names the mismatching layers
    assert not (tmp_path / "runs").exists()


def test_uncertainty_is_reported_per_case_next_to_the_metric(tmp_path: Path,
                                                             data_dir: Path) -> None:
    heldout = data_dir / "medmnist_breast" / "breastmnist.npz"
    run_dir = _run(tmp_path, data_dir, "tta", rounds=1, uncertainty="tta",
                   uncertainty_samples=4, eval_root=str(heldout), eval_format="medmnist")
    rounds = read_rounds(run_dir)
    for r in rounds:
        assert 0 < r["heldout"]["uncertainty-mean"] <= math.log(2)
    report = json.loads((run_dir / HELDOUT_CASES_FILE).read_text())
    cases = report["cases"]
    assert report["method"] == "tta" and len(cases) == 156  # BreastMNIST's test split
    assert sorted(c["index"] for c in cases) == list(range(156))
    unc = [c["uncertainty"] for c in cases]
    assert unc == sorted(unc, reverse=True) and max(unc) > min(unc) >= 0
    # the per-case values agree with the round's aggregate
    assert sum(c["value"] for c in cases) / 156 == pytest.approx(
        rounds[-1]["heldout"]["accuracy"], abs=1e-6)
    assert sum(unc) / 156 == pytest.approx(rounds[-1]["heldout"]["uncertainty-mean"],
                                            rel=1e-4)
    assert HELDOUT_CASES_FILE in artifact_paths(run_dir)
