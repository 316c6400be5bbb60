"""A federated run in which each SuperNode trains on what it ingested from its own Orthanc."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

import fedpacs
from fedpacs.client.config import load_site_config
from fedpacs.client.data import load_site_data
from fedpacs.client.volumes import list_volumes, load_volume
from fedpacs.common.config import RunConfig
from fedpacs.common.procs import free_port
from fedpacs.common.tasks import get_task
from fedpacs.deploy.cli import main
from fedpacs.deploy.demo import run_once
from fedpacs.deploy.orthanc import OrthancServer, orthanc_available, store_files
from fedpacs.server.coordinator.federation import SiteSpec
from fedpacs.server.coordinator.pki import provision

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not orthanc_available() and not os.environ.get("CI"), reason="Orthanc not installed")]


def files_of(*folders: Path) -> list[Path]:
    return sorted(p for d in folders for p in d.rglob("*") if p.is_file()
                  and p.suffix != ".md" and p.name != "LICENSE" and "README" not in p.name)


def test_sites_train_on_what_they_ingested(tmp_path: Path, data_dir: Path) -> None:
    mr, ct = data_dir / "dicom_brainmr", data_dir / "dicom_ct_dcmqa"
    holdings = {  # each hospital's PACS holds different studies
        "site-a": ("c-get", files_of(mr / "Study1", ct / "GE_HiSpeed_head_tilt")),
        "site-b": ("dicomweb", files_of(mr / "Study2", ct / "Philips_Ingenuity_phantom")),
    }
    servers: list[OrthancServer] = []
    site_files: dict[str, Path] = {}
    pki = provision(tmp_path / "fed" / "pki", sites=list(holdings))
    try:
        for name, (method, files) in holdings.items():
            server = OrthancServer(tmp_path / f"orthanc-{name}").start()
            servers.append(server)
            stored, failed = store_files(server.pacs_config(), files)
            assert failed == [] and stored == len(files)
            home = tmp_path / name
            home.mkdir()
            (home / "labels.csv").write_text("SeriesInstanceUID,label\n")
            cfg = home / "site.toml"
            cfg.write_text(
                f'[site]\nname = "{name}"\ntask = "pacs-modality"\n\n[data]\nformat = "pacs"\n'
                f'root = "cache"\nlabels = "labels.csv"\nval_fraction = 0.2\n\n'
                f'[compute]\nthreads = 1\n\n[pacs]\nmethod = "{method}"\nport = '
                f'{server.dicom_port}\ndicomweb_url = "{server.dicomweb_url}"\n'
                f'cache_dir = "cache"\n\n[security]\nrequire_secagg = false\n'
                f'trusted_app_keys = ["{pki.app_pub}"]\n')
            assert main(["site", "ingest", "--config", str(cfg)]) == 0
            # the hospital labels its ingested series (here: 1 = CT, 0 = MR)
            with (home / "labels.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["SeriesInstanceUID", "label"])
                for vol in list_volumes(home / "cache"):
                    _, meta = load_volume(vol)
                    w.writerow([meta["series_uid"], int(meta["modality"] == "CT")])
            site_files[name] = cfg
    finally:
        for s in servers:  # the PACS is not needed for training: the cache is
            s.stop()
    expected = {name: len(load_site_data(load_site_config(p).data,
                                         get_task("pacs-modality")).train)
                for name, p in site_files.items()}
    assert all(n > 50 for n in expected.values())
    run = RunConfig(task="pacs-modality", rounds=2, local_epochs=1, batch_size=16, lr=1e-3,
                    min_sites=2, secagg=False)  # 2 sites: SecAgg+ needs 3
    sites = [SiteSpec(name, p, "pacs-modality", free_port()) for name, p in site_files.items()]
    res = run_once(tmp_path / "fed", pki, sites, run, timeout_s=600, echo=lambda _: None)
    assert res.status == "finished:completed"
    for r in res.rounds[1:]:
        assert {k: v["num-examples"] for k, v in r["train_sites"].items()} == expected
        assert set(r["evaluate_sites"]) == {"site-a", "site-b"}
    model, card = fedpacs.load_model(str(res.final_model))
    assert card["sites"] == expected and card["task"]["name"] == "pacs-modality"
