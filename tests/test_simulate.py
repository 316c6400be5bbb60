"""`fedpacs simulate` (fedpacs.deploy.simulate): bad input refused quickly and coded (an
unreachable Ray address, a split that cannot train), the out-of-memory report, and one
real simulation on Flower's Simulation Engine (local Ray): BreastMNIST, 3 virtual sites,
2 rounds, whose run directory is a deployed run's and whose round-1 results equal a
loopback run of the same config and the same virtual sites."""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedpacs.common.errors import ConfigError, ExitCode, SimulationError
from fedpacs.deploy.cli import main
from fedpacs.deploy.simulate import (
    MemoryReport,
    OutOfMemoryWatch,
    check_ray_address,
    oom_error,
    out_of_memory,
)

pytestmark = [pytest.mark.usefixtures("task_identity"),
              # Ray leaves the /dev/null handles of the processes it started to the garbage
              # collector (ray/_private/services.py); not fedpacs' to close
              pytest.mark.filterwarnings("ignore::ResourceWarning")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _npz(data_dir: Path) -> str:
    return str(data_dir / "medmnist_breast" / "breastmnist.npz")


def test_unreachable_ray_address_is_a_coded_error_at_once(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(tmp_path / "r"),
               "--ray-address", address, "--connect-timeout", "2"])
    assert rc == ExitCode.SIMULATION
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert address in err and "cannot be reached" in err and "Fix:" in err
    assert not (tmp_path / "r").exists()  # nothing written, nothing started
    # a port that takes connections but never answers (not a Ray head; a stalled
    # proxy) is refused at the deadline, not waited on
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SimulationError, match=f"{mute}.*does not answer as a Ray head"):
            check_ray_address(mute, timeout_s=1.0)
        assert 0.9 < time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="--ray-address"):
        check_ray_address("no-port-here", timeout_s=1.0)


def test_cli_refuses_bad_partitions_before_ray_starts(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(tmp_path / "a"),
               "--partition", "zipf"])
    assert rc == ExitCode.CONFIG and "--partition" in capsys.readouterr().err
    # 100 sites of BreastMNIST's 624 pooled cases cannot each fill a batch of 32
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(tmp_path / "b"),
               "--sites", "100", "--no-secagg", "--task", "breastmnist"])
    err = capsys.readouterr().err
    assert rc == ExitCode.CONFIG
    assert "site sim-000: expected >= 32 training cases (one batch)" in err
    assert not (tmp_path / "b" / "metrics.json").exists()
    # every class on every site, when asked: a site without one is named with its class
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(tmp_path / "c"),
               "--sites", "5", "--partition", "dirichlet", "--alpha", "0.05",
               "--batch-size", "2", "--no-secagg", "--task", "breastmnist",
               "--require-all-classes"])
    err = capsys.readouterr().err
    assert rc == ExitCode.CONFIG and "(every class on every site was required)" in err
    assert "class 0 (malignant)" in err or "class 1 (normal/benign)" in err


def test_out_of_memory_names_site_count_and_memory_per_site() -> None:
    watch = OutOfMemoryWatch()
    mem = MemoryReport(actors=2, peak_rss_mib={11: 640.0, 12: 655.5},
                       min_available_mib=300.0, total_mib=24000.0)
    assert not out_of_memory(watch, mem)
    logging.getLogger("flwr.test").addHandler(watch)
    try:
        logging.getLogger("flwr.test").error("Task was killed due to the node running low "
                                             "on memory. ray.exceptions.OutOfMemoryError")
    finally:
        logging.getLogger("flwr.test").removeHandler(watch)
    assert out_of_memory(watch, mem)
    msg = str(oom_error(100, mem, cpus_per_site=1.0))
    assert "100 virtual sites ran out of memory" in msg and "656 MiB per running" in msg
    assert oom_error(100, mem, cpus_per_site=1.0).code == ExitCode.SIMULATION
    # an actor death with the machine nearly out of memory counts too, not otherwise
    died = OutOfMemoryWatch()
    died.died.append("ray.exceptions.ActorDiedError")
    assert out_of_memory(died, mem)
    assert not out_of_memory(died, MemoryReport(min_available_mib=9000.0, total_mib=24000.0))


def test_a_real_out_of_memory_kill_names_the_site_count_and_memory_per_site(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's own memory monitor, told that any use of this machine's memory is over its
    # limit, kills the ClientApp workers as it would on a machine out of memory
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.01")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "50")
    run_dir = tmp_path / "oom"
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(run_dir),
               "--task", "breastmnist", "--sites", "3", "--rounds", "1",
               "--local-epochs", "1", "--batch-size", "64", "--no-secagg"])
    err = capsys.readouterr().err
    assert rc == ExitCode.SIMULATION, err[-2000:]
    assert "the simulation of 3 virtual sites ran out of memory" in err
    assert re.search(r": \d+ MiB per running virtual site \((peak resident memory|what Ray "
                     r"measured)", err), err[-2000:]
    assert "Fix: run fewer sites at once" in err
    # the run directory does not pass for a finished run
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["error"]) == ("failed", "SimulationError")
    assert "ran out of memory" in status["detail"]
    # no round changed the model: nothing was published, no model, card or report
    assert not (run_dir / "final").exists() and not (run_dir / "report").exists()
    assert _ray_descendants() == []
    gc.collect()


def _ray_descendants() -> list[str]:
    """Live (not zombie) processes under this one that belong to Ray."""
    import os

    from fedpacs.common.procs import process_parents

    tree = process_parents()
    kids: dict[int, list[int]] = {}
    for pid, ppid in tree.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], list(kids.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ray" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append(f"{pid} {cmd[:80]}")
    return out


def test_simulation_writes_a_deployed_runs_directory_and_matches_loopback(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpacs.client.app import app as client_app
    from fedpacs.client.app import sim_site_file
    from fedpacs.common.config import RunConfig
    from fedpacs.server.app import run_federation
    from tests.loopback import LoopbackGrid

    run_dir = tmp_path / "sim"
    rc = main(["simulate", "--data", _npz(data_dir), "--run-dir", str(run_dir),
               "--task", "breastmnist", "--sites", "3", "--rounds", "2",
               "--local-epochs", "1", "--batch-size", "64", "--no-secagg",
               "--partition", "dirichlet", "--alpha", "1.0", "--split-seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sim-000:" in out and "per class 0:" in out  # the summary came first
    assert _ray_descendants() == []  # Ray's processes are gone with the run
    gc.collect()  # (Ray's unclosed handles, finalised here under this module's filter)
    # a deployed run's directory: metrics, checkpoints, final model and card, report
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[1]["train_sites"]) == {"sim-000", "sim-001", "sim-002"}
    assert rounds[2]["evaluate"] is not None and rounds[2]["heldout"]["num-examples"] == 156
    card = json.loads((run_dir / "final" / "model_card.json").read_text())
    assert card["num_rounds"] == 2 and card["secure_aggregation"] == "off"
    assert set(card["sites"]) == {"sim-000", "sim-001", "sim-002"}
    assert (run_dir / "final" / "model.pt").is_file()
    assert (run_dir / "report" / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    split = json.loads((run_dir / "split.json").read_text())
    assert split["partitioner"] == "dirichlet" and split["params"]["alpha"] == 1.0
    sim = json.loads((run_dir / "simulation.json").read_text())
    assert sim["sites"] == 3 and sim["memory"]["per_site_mib"] > 100  # torch + MONAI
    # the same config on the same virtual sites over the in-memory grid: same round 1
    cfg = RunConfig.from_flat(json.loads((run_dir / "run-config.json").read_text()),
                              check=False)
    loop_dir = tmp_path / "loop"
    sites = {i + 1: sim_site_file(run_dir / "sites", i) for i in range(3)}
    run_federation(LoopbackGrid(client_app, sites), RunConfig.from_flat(
        cfg.to_flat() | {"run-dir": str(loop_dir)}, check=False),
        Context(1, 0, {}, RecordDict(), {}))
    loop = json.loads((loop_dir / "metrics.json").read_text())["rounds"]
    # bit-identical: each site's training is seeded by the run's seed, the round and its
    # partition, and the server aggregates in site-name order whatever order the replies
    # arrive in (Ray's is not fixed; a float sum depends on it)
    for r in (1, 2):
        assert loop[r]["weights_sha256"] == rounds[r]["weights_sha256"], r
        assert loop[r]["heldout"] == rounds[r]["heldout"], r
        for name, metrics in rounds[r]["train_sites"].items():
            theirs = loop[r]["train_sites"][name]
            assert _untimed(metrics) == _untimed(theirs), (r, name)


def _untimed(metrics: dict[str, float]) -> dict[str, float]:
    """A site's metrics without its wall times (which differ between any two runs)."""
    return {k: v for k, v in metrics.items() if k != "train-seconds" and not k.startswith("t-")}
