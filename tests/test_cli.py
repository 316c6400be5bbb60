"""CLI in-process: errors name the field and the fix, and exit with registered codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpacs.common.errors import EXIT_CODES, ExitCode, describe
from fedpacs.deploy.cli import main


def test_every_exit_code_has_help() -> None:
    assert set(EXIT_CODES) == set(ExitCode)
    assert all(len(describe(c)) > 10 for c in ExitCode)


def test_exit_codes_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exit-codes"]) == 0
    out = capsys.readouterr().out
    assert "CONFIG" in out and "TIMEOUT" in out


def test_site_check_ok(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.toml"
    p.write_text(f'[site]\nname = "h"\ntask = "breastmnist"\n[data]\nformat = "medmnist"\n'
                 f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\n')
    assert main(["site", "check", "--config", str(p)]) == 0
    assert "546 training and 78 validation samples" in capsys.readouterr().out


def test_bad_site_config_stops_the_daemon(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.toml"
    p.write_text('[site]\nname = "h"\ntask = "segment-everything"\n[data]\nformat = "nifti"\n'
                 'root = "/missing/hippocampus"\n')
    code = main(["site", "start", "--config", str(p), "--superlink", "127.0.0.1:1",
                 "--root-certificates", str(p), "--auth-key", str(p)])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "site.task" in err and "data.root" in err and "/missing/hippocampus" in err
    assert "Fix:" in err


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--sites", "many"]) == ExitCode.USAGE


def test_provision_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "init", "--dir", str(tmp_path), "--site", "site-a"]) == 0
    assert main(["provision", "add-site", "site-b", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "sites" / "site-b" / "site-b.pub").is_file()


def test_child_env_finds_flower_scripts_without_an_activated_venv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import sys

    from fedpacs.common.procs import child_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = child_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    found = shutil.which("flower-superexec", path=env["PATH"])
    assert found is not None and Path(found).parent == Path(sys.executable).parent


def test_run_start_needs_no_demo_data_and_names_every_bad_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A coordinator without the shared demo data sets: `run start --config` validates the
    nested run.toml against the federation, names every problem, starts nothing."""
    from fedpacs.server.coordinator.federation import Federation, SiteState
    from fedpacs.server.coordinator.pki import Pki

    monkeypatch.setenv("FEDPACS_DATA_DIR", str(tmp_path / "no-such-data"))
    monkeypatch.chdir(tmp_path)
    fed = Federation.new(tmp_path / "fed", Pki(tmp_path / "fed" / "pki"))
    fed.state.sites = {"site-a": SiteState("a.toml", "breastmnist"),
                       "site-b": SiteState("b.toml", "breastmnist")}
    fed.save()
    run = tmp_path / "run.toml"
    run.write_text('[run]\ntask = "breastmnist"\nmin_sites = 3\n[strategy]\nname = "krum"\n'
                   '[secagg]\nenabled = false\n')
    code = main(["run", "start", "--workdir", str(tmp_path / "fed"), "--config", str(run),
                 "--lr", "-1"])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "min-sites" in err and "lr" in err and "data-dir" not in err
    assert not (tmp_path / "fed" / "runs").exists() and not (tmp_path / "fed" / "apps").exists()


def test_registry_publish_refuses_with_codes(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "unfinished").mkdir()
    code = main(["registry", "publish", str(tmp_path / "unfinished"), "--id", "bad id!",
                 "--root", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "--id" in err and "run_dir" in err and "Traceback" not in err


def test_federation_up_refuses_bad_addresses_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "fed"
    code = main(["federation", "up", "--workdir", str(work), "--sites", "-1",
                 "--fleet-address", "0.0.0.0:9092"])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG and "--sites" in err and "--fleet-address" in err
    code = main(["federation", "up", "--workdir", str(work), "--sites", "0",
                 "--fleet-address", "127.0.0.1:9092", "--control-port", "9092"])
    assert code == ExitCode.CONFIG and "--control-port" in capsys.readouterr().err
    assert main(["federation", "up", "--workdir", str(work), "--sites", "0",
                 "--fleet-address", "coordinator"]) == ExitCode.CONFIG
    assert "HOST:PORT" in capsys.readouterr().err
    assert not work.exists()


def test_a_fleet_host_the_certificate_does_not_name_is_refused(tmp_path: Path) -> None:
    from fedpacs.common.errors import ConfigError
    from fedpacs.server.coordinator.federation import Federation
    from fedpacs.server.coordinator.pki import provision
    from fedpacs.server.superlink import ListenAddress

    pki = provision(tmp_path / "pki", sites=[])
    fed = Federation.new(tmp_path / "fed", pki, fleet=ListenAddress("10.77.0.1", 9092),
                         control_port=9093)
    with pytest.raises(ConfigError) as exc:
        fed.start_superlink()
    assert "--fleet-address" in str(exc.value) and "--host 10.77.0.1" in str(exc.value)
    assert fed.state.superlink_pid == 0 and not fed.procs.procs
    argv = fed.superlink_argv()  # Flower's listener on loopback, the public one for sites
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "9093"
    assert argv[argv.index("--fleet-address") + 1] == "10.77.0.1:9092"


def test_federation_register_names_a_missing_key(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from fedpacs.server.coordinator.federation import Federation
    from fedpacs.server.coordinator.pki import Pki

    Federation.new(tmp_path / "fed", Pki(tmp_path / "fed" / "pki")).save()
    code = main(["federation", "register", "hospital-a", "--workdir", str(tmp_path / "fed")])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG and "--public-key" in err and "add-site hospital-a" in err
