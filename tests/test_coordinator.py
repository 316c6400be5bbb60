"""The coordinator's CLI against a real federation: start a run and watch its status
change, refuse bad configs before anything starts, stop another run mid-way."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedpacs.common.errors import ExitCode
from fedpacs.common.procs import child_env, process_alive, tool
from fedpacs.deploy.cli import main
from tests.test_e2e import scrape_metrics

pytestmark = pytest.mark.e2e


def _run_id(out: str) -> int:
    m = re.search(r"run (\d+) started", out)
    assert m, out
    return int(m.group(1))


def _status(work: Path, run_id: int, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["run", "status", str(run_id), "--workdir", str(work)]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_start_watch_stop(tmp_path: Path, data_dir: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "fed"
    # `federation up` detaches its processes and exits, so it runs as its own process here
    up = subprocess.run([tool("fedpacs"), "federation", "up", "--workdir", str(work), "--task",
                         "breastmnist", "--sites", "2", "--data-dir", str(data_dir),
                         "--no-require-secagg", "--share-local-models"],
                        capture_output=True, text=True, timeout=300, env=child_env())
    assert up.returncode == 0, up.stderr
    assert "server metrics http://127.0.0.1:" in up.stdout
    state = json.loads((work / "federation.json").read_text())
    pids = {n: s["pid"] for n, s in state["sites"].items()}
    urls = {n: f"http://127.0.0.1:{s['metrics_port']}/metrics" for n, s in state["sites"].items()}
    try:
        heldout = data_dir / "medmnist_breast" / "breastmnist.npz"  # on the coordinator
        base = ["run", "start", "--workdir", str(work), "--task", "breastmnist",
                "--eval-root", str(heldout), "--local-epochs", "1", "--min-sites", "2",
                "--no-secagg"]  # 2 sites: plain FedAvg family (SecAgg+ needs 3)
        # refused, with the field named, before anything starts
        assert main([*base, "--min-sites", "3"]) == ExitCode.CONFIG
        assert "min-sites" in capsys.readouterr().err
        assert main([*base, "--strategy", "fedsgd", "--network", "unet"]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert "strategy" in err and "network" in err
        assert not any((work / "runs").iterdir())  # no run was created

        assert main([*base, "--rounds", "2", "--strategy", "fedmedian", "--fedbn",
                     "--cross-site-local"]) == 0
        run_a = _run_id(capsys.readouterr().out)
        seen: list[str] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = _status(work, run_a, capsys)
            seen.append(str(st["status"]))
            if seen[-1].startswith("finished"):
                break
            time.sleep(2)
        assert seen[-1] == "finished:completed" and len(set(seen)) >= 2, seen
        assert st["round"] == 2 and st["latest"]["heldout"]["accuracy"] > 0  # type: ignore[index]
        # FedBN across real ClientApp processes: in round 2 every site evaluated with the
        # normalisation layers it kept in its SuperNode state after training
        assert st["latest"]["evaluate"]["fedbn-restored"] > 0  # type: ignore[index]
        # plain mode, both sites consenting: the NxN cross-site matrix (FedMedian pops the
        # updates it reads; the server keeps each site's local model before that)
        card = json.loads((Path(str(st["run_dir"])) / "final" / "model_card.json").read_text())
        assert set(card["cross_site"]) == {"global", "site-a", "site-b"}
        assert all(set(row) == {"site-a", "site-b"} for row in card["cross_site"].values())
        server = scrape_metrics(f"http://127.0.0.1:{state['metrics_port']}/metrics")
        assert server["fedpacs_round"] == 2 and server["fedpacs_rounds_total"] == 2
        site_a = scrape_metrics(urls["site-a"])
        assert site_a["fedpacs_site_rounds_total"] == 2
        assert main(["run", "logs", str(run_a), "--workdir", str(work)]) == 0
        assert "fedmedian" in capsys.readouterr().out.lower()

        assert main([*base, "--rounds", "50"]) == 0
        run_b = _run_id(capsys.readouterr().out)
        while time.monotonic() < deadline:
            st = _status(work, run_b, capsys)
            if isinstance(st.get("round"), int) and st["round"] >= 1:  # type: ignore[operator]
                break
            time.sleep(2)
        assert main(["run", "stop", str(run_b), "--workdir", str(work)]) == 0
        capsys.readouterr()
        while time.monotonic() < deadline:
            st = _status(work, run_b, capsys)
            if str(st["status"]).startswith("finished"):
                break
            time.sleep(2)
        assert st["status"] == "finished:stopped" and st["round"] < 50  # type: ignore[operator]

        # a new key for site-b, without touching site-a; then site-b revoked for good
        # (own processes, as `federation up`: the restarted daemon outlives the command)
        old_b = pids["site-b"]
        rot = subprocess.run([tool("fedpacs"), "federation", "rotate", "site-b", "--workdir",
                              str(work)], capture_output=True, text=True, timeout=300,
                             env=child_env())
        assert rot.returncode == 0 and "new key registered" in rot.stdout, rot.stderr
        rotated = json.loads((work / "federation.json").read_text())
        new_b = rotated["sites"]["site-b"]["pid"]
        assert not process_alive(old_b) and process_alive(new_b)
        assert rotated["sites"]["site-a"]["pid"] == pids["site-a"]
        assert process_alive(pids["site-a"])
        # the offline-looking `provision revoke-site` finds the running federation of its
        # PKI and unregisters the node too (as `federation revoke` does)
        rev = subprocess.run([tool("fedpacs"), "provision", "revoke-site", "site-b", "--dir",
                              str(work / "pki")], capture_output=True, text=True, timeout=120,
                             env=child_env())
        assert rev.returncode == 0 and "unregistered" in rev.stdout, rev.stderr
        after = json.loads((work / "federation.json").read_text())
        assert "site-b" not in after["sites"]
        assert not process_alive(new_b)
        revoked = json.loads((work / "pki" / "revoked.json").read_text())
        assert [r["site"] for r in revoked] == ["site-b", "site-b"]
    finally:
        assert main(["federation", "down", "--workdir", str(work)]) == 0
    for pid in [state["superlink_pid"], state["exporter_pid"], *pids.values()]:
        assert not process_alive(pid)
    assert not (work / "federation.json").exists()
