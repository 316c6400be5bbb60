"""Personalisation where sites' data differ: local fine-tuning after the federation
(`personalize = "finetune"`), and FedBN only where the network has normalisation state
to keep local (the hippocampus U-Net's instance norm has none)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedpacs.client.app import app as client_app
from fedpacs.common.config import RunConfig, load_run_config
from fedpacs.common.errors import ConfigError
from fedpacs.common.models import learned_norm_networks, norm_state_count
from fedpacs.common.tasks import task_with_network
from fedpacs.server.app import run_federation
from fedpacs.server.rundir import read_rounds
from tests.loopback import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _skewed_sites(src: Path, folder: Path) -> list[Path]:
    """Two BreastMNIST .npz files with disjoint, label-skewed train and validation splits:
    site 0 sees mostly class 1 (benign), site 1 mostly class 0 (malignant), 10 : 1."""
    with np.load(src) as npz:
        d = {k: npz[k] for k in npz.files}
    sizes = {"train": (90, 9), "val": (18, 2)}  # (major, minor) per site
    picks: list[dict[str, np.ndarray]] = [{}, {}]
    for split, (n_major, n_minor) in sizes.items():
        labels = d[f"{split}_labels"].reshape(-1)
        by_class = {c: list(np.flatnonzero(labels == c)) for c in (0, 1)}
        for site, major in ((0, 1), (1, 0)):
            take = [by_class[major][:n_major], by_class[1 - major][:n_minor]]
            by_class[major] = by_class[major][n_major:]
            by_class[1 - major] = by_class[1 - major][n_minor:]
            picks[site][split] = np.array(sorted(take[0] + take[1]), dtype=np.int64)
    out = []
    for site in (0, 1):
        arrays = {f"{split}_{kind}": d[f"{split}_{kind}"][picks[site][split]]
                  for split in sizes for kind in ("images", "labels")}
        arrays |= {"test_images": d["test_images"][:8], "test_labels": d["test_labels"][:8]}
        path = folder / f"skew{site}.npz"
        np.savez(path, **arrays)
        out.append(path)
    return out


def _sites(tmp_path: Path, data_dir: Path) -> dict[int, Path]:
    npzs = _skewed_sites(data_dir / "medmnist_breast" / "breastmnist.npz", tmp_path)
    out = {}
    for i, npz in enumerate(npzs):
        p = tmp_path / f"site{i}.toml"
        p.write_text(f'[site]\nname = "site-{i}"\ntask = "breastmnist"\n[data]\n'
                     f'format = "medmnist"\nroot = "{npz}"\n[compute]\nthreads = 1\n'
                     '[security]\nrequire_secagg = false\n')
        out[i + 1] = p
    return out


def test_finetuning_after_the_federation_is_recorded_per_site(tmp_path: Path,
                                                              data_dir: Path) -> None:
    cfg = RunConfig(task="breastmnist", rounds=2, local_epochs=1, batch_size=16, lr=0.001,
                    min_sites=2, round_timeout_s=60.0, cross_site=False, secagg=False,
                    seed=1, personalize="finetune", personalize_epochs=3,
                    run_dir=str(tmp_path / "run"), run_name="run")
    assert not cfg.validate()
    grid = LoopbackGrid(client_app, _sites(tmp_path, data_dir))
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    personal = metrics["personalization"]
    card = json.loads((tmp_path / "run" / "final" / "model_card.json").read_text())
    assert card["personalization"] == personal
    assert personal["method"] == "finetune" and personal["epochs"] == 3
    before, after = personal["before"], personal["after"]
    assert set(before["sites"]) == set(after["sites"]) == {"site-0", "site-1"}
    # "before" is the final global model on each site's validation split: exactly the
    # final evaluation the run recorded for its last round
    final_eval = read_rounds(tmp_path / "run")[-1]["evaluate_sites"]
    for site in ("site-0", "site-1"):
        assert before["sites"][site]["val-accuracy"] == final_eval[site]["val-accuracy"]
        assert before["sites"][site]["val-loss"] == final_eval[site]["val-loss"]
        assert after["sites"][site]["train-loss"] > 0 and after["sites"][site]["epochs"] == 3
    # on label-skewed sites (10 : 1, opposite majorities) the global model leans one way;
    # fine-tuning on a site's own data fits its own distribution: the AUC rises at every
    # site and the mean accuracy with it (seeded; measured: AUC 0.50 -> 0.61 and
    # 0.42 -> 0.72, mean accuracy 0.50 -> 0.70)
    for site in ("site-0", "site-1"):
        assert after["sites"][site]["val-auc"] > before["sites"][site]["val-auc"], personal
    assert personal["gain"]["val-accuracy"] > 0.1, personal
    assert personal["gain"]["val-auc"] == pytest.approx(
        after["mean"]["val-auc"] - before["mean"]["val-auc"])
    # the personal model stayed at each site, in its own state
    from fedpacs.client.trainer import PERSONAL_STATE_KEY

    assert all(PERSONAL_STATE_KEY in c.state.array_records for c in grid.contexts.values())
    # the run's report shows each site's metric before and after, and the means
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "Personalisation (finetune, 3 epoch(s))" in page
    for site in ("site-0", "site-1"):
        row = (f"<tr><td>{site}</td><td>{before['sites'][site]['val-accuracy']:.4f}</td>"
               f"<td>{after['sites'][site]['val-accuracy']:.4f}</td></tr>")
        assert row in page, row


def test_personalize_options_are_validated(tmp_path: Path) -> None:
    errs = RunConfig(task="breastmnist", personalize="fine-tune", secagg=False).validate()
    assert any(e.field == "personalize" and "finetune" in str(e) for e in errs)
    errs = RunConfig(task="breastmnist", personalize="finetune", personalize_epochs=0,
                     secagg=False).validate()
    assert any(e.field == "personalize-epochs" for e in errs)
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\ntask = "breastmnist"\n[personalize]\nmethod = "finetune"\n'
                    "epochs = 4\n")
    cfg = load_run_config(toml, {})
    assert (cfg.personalize, cfg.personalize_epochs) == ("finetune", 4)


@pytest.mark.parametrize(("task", "network", "kept"), [
    ("hippocampus", "", 0),  # MONAI UNet, instance norm without affine parameters
    ("hippocampus", "resunet", 0),
    ("breastmnist", "vgg16", 0),  # no normalisation layers at all
    ("breastmnist", "", 100),  # ResNet-18: 20 batch norms x 5 entries
    ("hippocampus", "segresnet", 50),  # group norms with affine weight and bias
])
def test_what_fedbn_keeps_per_network(task: str, network: str, kept: int) -> None:
    assert norm_state_count(task_with_network(task, network)) == kept


def test_fedbn_is_refused_where_nothing_would_stay_local() -> None:
    errs = [e for e in RunConfig(task="hippocampus", fedbn=True, secagg=False).validate()
            if e.field == "fedbn"]
    assert len(errs) == 1
    text = str(errs[0])
    assert "'unet'" in text and "set fedbn = false" in text and "segresnet" in text
    assert "unet" not in learned_norm_networks(task_with_network("hippocampus", ""))
    # a network with learned normalisation is accepted
    assert not [e for e in RunConfig(task="hippocampus", network="segresnet", fedbn=True,
                                     secagg=False).validate() if e.field == "fedbn"]
    assert not [e for e in RunConfig(task="breastmnist", fedbn=True, secagg=False).validate()
                if e.field == "fedbn"]
    with pytest.raises(ConfigError, match="fedbn"):
        RunConfig.from_flat(RunConfig(task="hippocampus", fedbn=True, secagg=False).to_flat())
