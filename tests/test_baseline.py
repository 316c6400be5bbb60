"""Baselines (fedpacs.server.baseline, `fedpacs baseline`): trained with the run's budget,
evaluated on the federated run's held-out cases, recorded in its format; and the
independent check that one site's centralized baseline *is* a one-site FedAvg run (the
same data order, seeds, learning rates and epochs; FedAvg of one update is that update)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpacs.client.app import app as client_app
from fedpacs.common.artifacts import read_model_file
from fedpacs.common.config import RunConfig
from fedpacs.common.datasets import read_medmnist
from fedpacs.common.errors import ConfigError, ExitCode
from fedpacs.deploy.cli import main
from fedpacs.deploy.cli.baseline import sites_from_configs
from fedpacs.server.app import run_federation
from fedpacs.server.baseline import (
    read_baseline,
    run_centralized,
    run_local,
    sites_from_pool,
)
from fedpacs.server.rundir import read_rounds
from tests.loopback import LoopbackGrid, breastmnist_sites

pytestmark = pytest.mark.usefixtures("task_identity")

PARTS = 12  # each site a twelfth of BreastMNIST: ~45 training images, fast


def _cfg(tmp_path: Path, data_dir: Path, name: str, **kw: Any) -> RunConfig:
    return RunConfig(**({"task": "breastmnist", "rounds": 2, "local_epochs": 1,
                         "batch_size": 16, "min_sites": 1, "round_timeout_s": 60.0,
                         "cross_site": False, "secagg": False, "lr": 0.01, "seed": 3,
                         "eval_format": "medmnist",
                         "eval_root": str(data_dir / "medmnist_breast" / "breastmnist.npz"),
                         "run_dir": str(tmp_path / name), "run_name": name} | kw))


def _federated(tmp_path: Path, data_dir: Path, n: int, **kw: Any) -> tuple[Path, dict]:
    sites = breastmnist_sites(tmp_path, data_dir, n=n, num_partitions=PARTS,
                              security="require_secagg = false\n")
    cfg = _cfg(tmp_path, data_dir, "fed", min_sites=n, **kw)
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    return tmp_path / "fed", sites


def _state(path: Path) -> dict[str, torch.Tensor]:
    return dict(read_model_file(path / "final" / "model.pt")["state_dict"])


def _keys(rows: list[dict]) -> list[set[str]]:
    return [set(r) for r in rows]


def test_one_site_centralized_is_one_site_fedavg(tmp_path: Path, data_dir: Path) -> None:
    fed, sites = _federated(tmp_path, data_dir, 1)
    cfg = _cfg(tmp_path, data_dir, "fed")
    out = run_centralized(cfg=cfg, sites=sites_from_configs(list(sites.values()), cfg),
                          out=tmp_path / "central", device="cpu")
    a, b = _state(fed), _state(out)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    fed_rows, base_rows = read_rounds(fed), read_rounds(out)
    # the same model after every round: the same held-out metrics, the same weights hash
    assert [r["heldout"] for r in fed_rows] == [r["heldout"] for r in base_rows]
    assert [r["weights_sha256"] for r in fed_rows] == [r["weights_sha256"] for r in base_rows]
    assert [r["evaluate"] for r in fed_rows] == [r["evaluate"] for r in base_rows]
    assert [r["train"]["train-loss"] for r in fed_rows[1:]] == \
        [r["train"]["train-loss"] for r in base_rows[1:]]
    assert [r.get("lr") for r in fed_rows] == [r.get("lr") for r in base_rows]
    # ... recorded with the same keys, row by row
    assert _keys(fed_rows) == _keys(base_rows)


def test_centralized_pools_every_site_on_the_same_heldout(tmp_path: Path,
                                                          data_dir: Path) -> None:
    fed, sites = _federated(tmp_path, data_dir, 3)
    cfg = _cfg(tmp_path, data_dir, "fed", min_sites=3)
    loaded = sites_from_configs(list(sites.values()), cfg)
    out = run_centralized(cfg=cfg, sites=loaded, out=tmp_path / "central", device="cpu")
    about = read_baseline(out)
    n_test = len(read_medmnist(data_dir / "medmnist_breast" / "breastmnist.npz")["test_labels"])
    assert about["heldout"]["case_ids"] == [f"test:{i}" for i in range(n_test)]
    fed_rows, rows = read_rounds(fed), read_rounds(out)
    assert len(rows) == len(fed_rows) == cfg.rounds + 1
    assert all(r["heldout"]["num-examples"] == n_test for r in rows + fed_rows)
    assert set(rows[1]["heldout"]) == set(fed_rows[1]["heldout"])  # the same metrics
    assert _keys(rows) == _keys(fed_rows)
    # the pool is the union of the sites' training splits; the budget the run's
    site_train = {s.name: len(s.data.train) for s in loaded}
    fed_train = {n: int(m["num-examples"]) for n, m in fed_rows[1]["train_sites"].items()}
    assert site_train == fed_train
    assert about["pooled_train"] == sum(site_train.values())
    assert rows[1]["train"]["num-examples"] == sum(site_train.values())
    assert about["epochs"] == cfg.rounds * cfg.local_epochs
    # evaluated on each site's validation split, as the federated model is
    assert set(rows[-1]["evaluate_sites"]) == set(fed_rows[-1]["evaluate_sites"]) \
        == {"site-0", "site-1", "site-2"}
    card = json.loads((out / "final" / "model_card.json").read_text())
    assert card["baseline"] == "centralized" and card["epochs"] == 2
    assert (out / "report" / "index.html").is_file()
    assert rows[-1]["weights_sha256"] != rows[0]["weights_sha256"]  # it trained


def test_local_baseline_per_site_and_mean(tmp_path: Path, data_dir: Path) -> None:
    cfg = _cfg(tmp_path, data_dir, "x", rounds=1)
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    sites = sites_from_pool(npz, cfg, partitions=PARTS)[:2]
    out = run_local(cfg=cfg, sites=sites, out=tmp_path / "local", device="cpu")
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["baseline"] == "local" and summary["sites"] == ["site-0", "site-1"]
    last = summary["rounds"][-1]
    per_site = {n: read_rounds(out / "sites" / n)[-1]["heldout"] for n in summary["sites"]}
    assert last["heldout_sites"] == per_site
    for k in ("accuracy", "auc", "loss"):
        values = [per_site[n][k] for n in per_site]
        assert last["heldout"][k] == pytest.approx(sum(values) / 2)
        assert last["heldout_spread"][k]["min"] == min(values)
        assert last["heldout_spread"][k]["max"] == max(values)
        assert last["heldout_spread"][k]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    # each site's own model on its own validation split only, trained on its own data
    for name in summary["sites"]:
        row = read_rounds(out / "sites" / name)[-1]
        assert set(row["evaluate_sites"]) == set(row["train_sites"]) == {name}
    assert set(last["evaluate_sites"]) == {"site-0", "site-1"}
    a, b = (_state(out / "sites" / n) for n in ("site-0", "site-1"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different models


def test_cli_runs_a_baseline_and_refuses_without_heldout(tmp_path: Path, data_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    npz = data_dir / "medmnist_breast" / "breastmnist.npz"
    sites = breastmnist_sites(tmp_path, data_dir, n=2, num_partitions=PARTS)
    run_toml = tmp_path / "run.toml"
    run_toml.write_text('[run]\ntask = "breastmnist"\nrounds = 1\n[training]\n'
                        'local_epochs = 1\nbatch_size = 16\nlr = 0.01\n')
    base = ["baseline", "centralized", "--config", str(run_toml), "--device", "cpu"]
    # no held-out data: refused, naming the field and the fix
    assert main([*base, "--out", str(tmp_path / "no"), *map(str, sites.values())]) \
        == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "[evaluation] root" in err and "--eval-root" in err
    # both site configs and --data: refused
    assert main([*base, "--eval-root", str(npz), "--data", str(npz), "--out",
                 str(tmp_path / "no"), str(sites[1])]) == ExitCode.CONFIG
    assert "SITES / --data" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main([*base, "--eval-root", str(npz), "--out", str(tmp_path / "c"),
                 *map(str, sites.values())]) == 0
    assert len(read_rounds(tmp_path / "c")) == 2
    assert set(read_baseline(tmp_path / "c")["sites"]) == {"site-0", "site-1"}


def test_a_site_of_another_task_is_refused(tmp_path: Path, data_dir: Path) -> None:
    sites = breastmnist_sites(tmp_path, data_dir, n=1)
    cfg = _cfg(tmp_path, data_dir, "x", task="pneumoniamnist")
    with pytest.raises(ConfigError) as err:
        sites_from_configs(list(sites.values()), cfg)
    assert "site.task" in str(err.value) and "pneumoniamnist" in str(err.value)
