"""The SuperLink's two listeners, with a real SuperLink on loopback (TLS from
fedpacs.server.coordinator.pki): the Fleet listener refuses the Control and Runtime APIs,
the ``flwr`` CLI works against the Control listener, and a killed SuperLink restarts on its
database with its registrations kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedpacs.common.errors import ConfigError, ExitCode
from fedpacs.common.procs import child_env, free_port, process_alive, tool, wait_until
from fedpacs.deploy.cli import main
from fedpacs.server.coordinator.control import SuperLinkUnreachable
from fedpacs.server.coordinator.federation import Federation
from fedpacs.server.coordinator.pki import provision
from fedpacs.server.superlink import (
    REFUSED_HEADER,
    REFUSED_STATUS,
    FleetOnly,
    ListenAddress,
    is_fleet_path,
    serve,
    split_fleet_flag,
)


def _post(url: str, ca: Path) -> tuple[int, dict[str, str]]:
    """POST an empty body; (status, lower-case headers), HTTP errors included."""
    req = urllib.request.Request(url, data=b"", method="POST",
                                 headers={"content-type": "application/protobuf"})
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


def _refused(status: int, headers: dict[str, str]) -> bool:
    return status == REFUSED_STATUS and REFUSED_HEADER.decode() in headers


def test_fleet_listener_serves_the_fleet_api_only_and_restart_keeps_the_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = provision(tmp_path / "fed" / "pki", sites=["site-a"])
    with Federation.new(tmp_path / "fed", pki) as fed:
        fed.start_superlink()
        fleet = f"https://{fed.address}"
        control = f"https://{fed.control_address}"
        assert fed.state.fleet.port != fed.state.control.port
        # the public listener: Control and Runtime API refused by the filter, also by a
        # path that climbs out of /v1/fleet/; the Fleet API reaches Flower (which wants
        # an authenticated SuperNode)
        for path in ("/v1/control/list-runs", "/v1/control/start-run",
                     "/v1/runtime/get-nodes", "/v1/runtime/pull-messages",
                     "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                     "/docs", "/openapi.json", "/health"):
            assert _refused(*_post(fleet + path, pki.ca_cert)), path
        status, headers = _post(fleet + "/v1/fleet/get-run", pki.ca_cert)
        assert not _refused(status, headers) and status in (401, 403)
        # Flower's own listener (loopback) serves the Control API, unfiltered
        status, headers = _post(control + "/v1/control/list-runs", pki.ca_cert)
        assert status == 200 and REFUSED_HEADER.decode() not in headers
        # the flwr CLI works against the control address (FLWR_HOME names it)
        assert fed.control_address in (fed.flwr_home / "config.toml").read_text()
        assert main(["federation", "register", "site-a", "--workdir", str(fed.workdir)]) == 0
        assert "registered" in capsys.readouterr().out
        (node,) = fed.list_nodes()
        # killed mid-way: commands by address say it cannot be reached, naming where
        os.kill(fed.state.superlink_pid, signal.SIGKILL)
        wait_until("SuperLink gone", lambda: not process_alive(fed.state.superlink_pid),
                   timeout_s=30)
        with pytest.raises(SuperLinkUnreachable, match=fed.control_address):
            fed.list_nodes()
        (runs := tmp_path / "runs").mkdir()
        code = main(["run", "status", "1", "--control", fed.control_address,
                     "--ca", str(pki.ca_cert), "--runs-dir", str(runs)])
        assert code == ExitCode.PROCESS
        assert fed.control_address in capsys.readouterr().err
        # restarted on its database, same addresses: the registration is still there
        # (`federation restart-superlink` calls this; in-process its child would outlive
        # the command's objects)
        fed.restart_superlink()
        assert process_alive(fed.state.superlink_pid)
        assert [n["node-id"] for n in fed.list_nodes()] == [node["node-id"]]
        assert _refused(*_post(f"https://{fed.address}/v1/control/list-runs", pki.ca_cert))
        # a SuperLink still running is not restarted
        assert main(["federation", "restart-superlink", "--workdir", str(fed.workdir)]) \
            == ExitCode.CONFIG
        assert "superlink" in capsys.readouterr().err
        state = json.loads((fed.workdir / "federation.json").read_text())
        assert state["control_port"] == fed.state.control_port
        assert state["superlink_pid"] == fed.state.superlink_pid


# ------------------------------------------------------------------ the filter, in-process
def test_fleet_flag_is_taken_out_before_flower_parses() -> None:
    rest, fleet = split_fleet_flag(["--host", "127.0.0.1", "--fleet-address", "10.77.0.1:9092",
                                    "--port", "9093"])
    assert rest == ["--host", "127.0.0.1", "--port", "9093"]
    assert fleet == ListenAddress("10.77.0.1", 9092)
    assert split_fleet_flag(["--fleet-address=[::1]:9092"])[1] == ListenAddress("::1", 9092)
    assert split_fleet_flag(["--port", "1"]) == (["--port", "1"], None)
    for bad in (["--fleet-address"], ["--fleet-address", "--port"],
                ["--fleet-address", "host"], ["--fleet-address", "h:0"],
                ["--fleet-address=a:1", "--fleet-address=b:2"]):
        with pytest.raises(ConfigError, match="--fleet-address"):
            split_fleet_flag(bad)


def test_only_fleet_paths_pass() -> None:
    for ok in ("/v1/fleet/pull-messages", "/v1/fleet/push-object"):
        assert is_fleet_path(ok)
    for bad in ("/v1/fleet/", "/v1/fleet", "/v1/control/start-run", "/v1/runtime/get-nodes",
                "/v1/fleet/../control/start-run", "/v1/fleet/./x", "/v1/fleet//x", "/",
                "/health", "/v1/fleetx/a", "//v1/fleet/a"):
        assert not is_fleet_path(bad), bad


def test_fleet_only_answers_404_outside_the_fleet_api() -> None:
    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def call(scope: dict[str, Any]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await FleetOnly(app)(scope, receive, send)
        return sent

    assert asyncio.run(call({"type": "http", "path": "/v1/fleet/get-run"})) == []
    sent = asyncio.run(call({"type": "http", "path": "/v1/control/start-run"}))
    assert sent[0]["status"] == REFUSED_STATUS and (REFUSED_HEADER, b"fleet-only") in \
        sent[0]["headers"]
    assert asyncio.run(call({"type": "websocket", "path": "/v1/fleet/x"})) == [
        {"type": "websocket.close", "code": 1008}]
    assert reached == ["/v1/fleet/get-run"]


def test_a_public_fleet_listener_needs_tls_and_a_loopback_control_listener() -> None:
    config = SimpleNamespace(certificates=None, host="0.0.0.0", port=9093)
    with pytest.raises(ConfigError) as exc:
        serve(config, fleet=ListenAddress("10.77.0.1", 9092))
    assert "--insecure" in str(exc.value) and "--host" in str(exc.value)


def test_federation_up_with_no_local_sites_runs_the_coordinators_part_only(
        tmp_path: Path) -> None:
    """`federation up --sites 0 --fleet-address ...`: SuperLink and exporter, no site
    daemon, no demo data needed; `federation down` stops them."""
    work = tmp_path / "coord"
    fleet_port = free_port()
    env = child_env({"FEDPACS_DATA_DIR": str(tmp_path / "no-data")})
    up = subprocess.run([tool("fedpacs"), "federation", "up", "--workdir", str(work),
                         "--sites", "0", "--fleet-address", f"127.0.0.1:{fleet_port}"],
                        capture_output=True, text=True, timeout=300, env=env)
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((work / "federation.json").read_text())
        assert (state["fleet_host"], state["fleet_port"]) == ("127.0.0.1", fleet_port)
        assert state["sites"] == {} and process_alive(state["superlink_pid"])
        assert f"fleet 127.0.0.1:{fleet_port}" in up.stdout
        assert "federation register NAME" in up.stdout
        assert _refused(*_post(f"https://127.0.0.1:{fleet_port}/v1/control/list-runs",
                               work / "pki" / "ca.pem"))
    finally:
        down = subprocess.run([tool("fedpacs"), "federation", "down", "--workdir", str(work)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert down.returncode == 0, down.stderr
