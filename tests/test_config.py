"""Config errors name the field, what was expected, what was received and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpacs.client.config import load_site_config
from fedpacs.common.config import RunConfig
from fedpacs.common.errors import ConfigError


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(body)
    return p


def test_valid_site_config_relative_root(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "data").symlink_to(data_dir / "medmnist_breast")
    p = _write(tmp_path, '[site]\nname = "h-a"\ntask = "breastmnist"\n[data]\nformat = '
               '"medmnist"\nroot = "data/breastmnist.npz"\npartition = 1\nnum_partitions = 2\n')
    cfg = load_site_config(p)
    assert cfg.data.root == (tmp_path / "data" / "breastmnist.npz").resolve()
    assert cfg.data.partition == 1 and cfg.compute.device == "auto"


def test_missing_path_and_wrong_task_reported_together(tmp_path: Path) -> None:
    p = _write(tmp_path, '[site]\nname = "h-a"\ntask = "brain-tumour"\n[data]\nformat = '
               '"nifti"\nroot = "/nope/hippo"\npartition = 3\nnum_partitions = 3\n')
    with pytest.raises(ConfigError) as exc:
        load_site_config(p)
    fields = {e.field for e in exc.value.errors}
    assert {"site.task", "data.root", "data.partition"} <= fields
    text = str(exc.value)
    assert "/nope/hippo" in text and "hippocampus" in text and "Fix:" in text
    assert str(p) in text


def test_unknown_key_and_bad_types(tmp_path: Path) -> None:
    p = _write(tmp_path, '[site]\nname = ""\ntask = "hippocampus"\ncolour = 1\n[data]\n'
               'format = "dicom"\nroot = 5\n[compute]\nthreads = -1\ndevice = "tpu"\n')
    with pytest.raises(ConfigError) as exc:
        load_site_config(p)
    fields = {e.field for e in exc.value.errors}
    assert {"site.colour", "site.name", "data.format", "data.root", "compute.threads",
            "compute.device"} <= fields


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "[site\nname=")
    with pytest.raises(ConfigError) as exc:
        load_site_config(p)
    assert str(p) in str(exc.value) and "valid TOML" in str(exc.value)


def test_no_config_given_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as exc:
        load_site_config(None)
    assert "FEDPACS_SITE_CONFIG" in str(exc.value) and "--node-config" in str(exc.value)


def test_env_is_used_when_no_flag(tmp_path: Path, data_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, f'[site]\nname = "h"\ntask = "breastmnist"\n[data]\nformat = '
               f'"medmnist"\nroot = "{data_dir}/medmnist_breast/breastmnist.npz"\n')
    monkeypatch.setenv("FEDPACS_SITE_CONFIG", str(p))
    assert load_site_config(None).name == "h"


def test_run_config_round_trip_and_errors() -> None:
    cfg = RunConfig(task="breastmnist", rounds=2)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"rounds": "three", "colour": 1})
    fields = {e.field for e in exc.value.errors}
    assert fields == {"rounds", "colour"}
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"rounds": 0, "task": "x", "lr": -1.0})
    assert {e.field for e in exc.value.errors} == {"rounds", "task", "lr"}


def test_security_table(tmp_path: Path, data_dir: Path) -> None:
    base = ('[site]\nname = "h-a"\ntask = "breastmnist"\n[data]\nformat = "medmnist"\n'
            f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\n')
    cfg = load_site_config(_write(tmp_path, base))
    assert cfg.require_secagg and cfg.security.trusted_app_keys == ()  # secure defaults
    (tmp_path / "coord.pub").write_text("key")
    cfg = load_site_config(_write(tmp_path, base + '[security]\nrequire_secagg = false\n'
                                  'trusted_app_keys = ["coord.pub"]\n'))
    assert not cfg.require_secagg
    assert cfg.security.trusted_app_keys == ((tmp_path / "coord.pub").resolve(),)
    with pytest.raises(ConfigError) as exc:
        load_site_config(_write(tmp_path, base + '[security]\nrequire_secagg = "yes"\n'
                                'trusted_app_keys = ["missing.pub"]\nsecagg = true\n'))
    assert {e.field for e in exc.value.errors} == {
        "security.require_secagg", "security.trusted_app_keys", "security.secagg"}
    assert "missing.pub" in str(exc.value)


def test_secagg_run_config_rules() -> None:
    assert RunConfig(min_sites=3).validate() == []  # SecAgg+ on by default
    errs = {e.field for e in RunConfig(strategy="krum", min_sites=2).validate()}
    assert errs == {"strategy", "min-sites"}
    assert RunConfig(strategy="krum", min_sites=3, secagg=False).validate() == []
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"dp-clip": -1.0, "max-update-norm": -2.0, "secagg-threshold": 0.0})
    assert {e.field for e in exc.value.errors} == {"dp-clip", "max-update-norm",
                                                   "secagg-threshold"}


def test_training_defaults_come_from_the_task_preset() -> None:
    from fedpacs.common.tasks import PRESET_TRAINING, TASK_PRESETS

    assert set(PRESET_TRAINING) == set(TASK_PRESETS)  # every preset has its recipe
    hippo, breast = RunConfig(task="hippocampus"), RunConfig(task="breastmnist")
    assert (hippo.local_epochs, hippo.batch_size, hippo.lr) == (2, 4, 3e-3)
    assert (breast.local_epochs, breast.batch_size, breast.lr) == (2, 32, 1e-3)
    assert RunConfig(task="breastmnist", lr=0.05).lr == 0.05  # a run may override one


def test_run_toml_sections_flags_and_errors(tmp_path: Path, data_dir: Path) -> None:
    from fedpacs.common.config import load_run_config

    held = tmp_path / "held"
    held.mkdir()
    (held / "breastmnist.npz").write_bytes(
        (data_dir / "medmnist_breast" / "breastmnist.npz").read_bytes())
    p = tmp_path / "run.toml"
    p.write_text('[run]\ntask = "breastmnist"\nrounds = 7\nmin_sites = 2\n'
                 '[training]\nlr = 0.01\n[strategy]\nname = "fedprox"\nproximal_mu = 0.1\n'
                 '[evaluation]\nroot = "held/breastmnist.npz"\n[secagg]\nenabled = false\n')
    cfg = load_run_config(p, {"rounds": 3})  # a flag overrides the file
    assert (cfg.task, cfg.rounds, cfg.min_sites, cfg.lr, cfg.batch_size) == \
        ("breastmnist", 3, 2, 0.01, 32)
    assert (cfg.strategy, cfg.proximal_mu, cfg.secagg) == ("fedprox", 0.1, False)
    # relative to the file's folder, format taken from the path
    assert cfg.eval_root == str(held / "breastmnist.npz") and cfg.eval_format == "medmnist"

    p.write_text('[run]\ntask = "breastmnist"\nrounds = "ten"\n[trainig]\nlr = 1\n'
                 '[strategy]\nname = "fedavg"\nmu = 2\n')
    with pytest.raises(ConfigError) as exc:
        load_run_config(p, {})
    fields = {e.field for e in exc.value.errors}
    assert {"trainig", "strategy.mu"} <= fields  # file problems, all together
    with pytest.raises(ConfigError) as exc:
        load_run_config(None, {"rounds": "ten"})
    assert {e.field for e in exc.value.errors} == {"rounds"}
    # values are checked together with what the coordinator knows (Federation.check_run)
    assert {e.field for e in load_run_config(None, {"lr": -1.0}).validate()} == {"lr"}


def test_site_names_go_on_past_z() -> None:
    from fedpacs.deploy.demo import site_names

    names = site_names(30)
    assert names[:2] == ["site-a", "site-b"] and names[25:28] == ["site-z", "site-aa", "site-ab"]
    assert len(set(names)) == 30


def test_the_recipe_is_validated_before_anything_starts(tmp_path: Path) -> None:
    """Recipe fields from run.toml and flags: each bad one named, with the choices and a
    did-you-mean; a loss or sampler that does not fit the task, and MC dropout on a
    network without dropout, refused."""
    from fedpacs.common.config import load_run_config

    toml = tmp_path / "run.toml"
    toml.write_text('[run]\ntask = "hippocampus"\n[training]\noptimizer = "adamm"\n'
                    'augment = "flip,elastik"\nloss = "focal"\nsampler = "balanced"\n'
                    'lr_schedule = "cosine"\nwarmup_rounds = 2\n'
                    '[evaluation]\nuncertainty = "mc-dropout"\n')
    cfg = load_run_config(toml, {})
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_rounds) == ("adamm", "cosine", 2)
    errs = {e.field: str(e) for e in cfg.validate()}
    assert set(errs) == {"optimizer", "augment", "loss", "sampler", "uncertainty"}
    assert "did you mean 'adam'" in errs["optimizer"]
    assert "did you mean 'elastic'" in errs["augment"]
    assert "dice-focal" in errs["loss"]  # the segmentation losses are offered
    assert "tta" in errs["uncertainty"]  # the U-Net has no dropout to sample
    ok = load_run_config(None, {"task": "breastmnist", "network": "alexnet",
                                "uncertainty": "mc-dropout", "loss": "focal",
                                "sampler": "balanced", "class_weights": "balanced"})
    assert ok.validate() == []
    with pytest.raises(ConfigError) as err:
        load_run_config(None, {"task": "breastmnist", "warmup_rounds": "2"})
    assert "warmup-rounds" in str(err.value)


def test_compute_amp_and_loader_workers_are_the_sites_own(tmp_path: Path,
                                                          data_dir: Path) -> None:
    base = ('[site]\nname = "h-a"\ntask = "breastmnist"\n[data]\nformat = "medmnist"\n'
            f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\n')
    default = load_site_config(_write(tmp_path, base))
    assert (default.compute.amp, default.compute.loader_workers) == (True, 2)
    off = load_site_config(_write(tmp_path, base + "[compute]\namp = false\nloader_workers = 0\n"))
    assert (off.compute.amp, off.compute.loader_workers) == (False, 0)
    with pytest.raises(ConfigError) as exc:
        load_site_config(_write(tmp_path, base + '[compute]\namp = "yes"\nloader_workers = -1\n'
                                'amp_level = 2\n'))
    assert {e.field for e in exc.value.errors} == {"compute.amp", "compute.loader_workers",
                                                   "compute.amp_level"}
