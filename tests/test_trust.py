"""A hospital that need not trust the coordinator: each attack carried out against the real
code path (the real ServerApp and ClientApp over the in-process grid, the real coordinator,
PKI and signing code), and shown to fail.
"""

from __future__ import annotations

import io
import json
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpacs.client.app import app as client_app
from fedpacs.common import wire
from fedpacs.common.artifacts import load_model
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import AuthError, ConfigError, ExitCode, NoUpdateError
from fedpacs.common.models import build_model
from fedpacs.common.signing import sign_app, verify_fab
from fedpacs.common.tasks import TASK_PRESETS, validate_task_dict
from fedpacs.server.app import run_federation
from fedpacs.server.coordinator.federation import Federation, SiteState
from fedpacs.server.coordinator.pki import (
    CA_PASSPHRASE_ENV,
    Pki,
    issue_server_cert,
    provision,
    revoke_site_key,
    rotate_site_key,
)
from fedpacs.server.rundir import RUNS_DIR_ENV, read_server_side
from tests.loopback import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")

TASK = "breastmnist"




def _site(tmp_path: Path, data_dir: Path, i: int, n: int, security: str = "") -> Path:
    p = tmp_path / f"site{i}.toml"
    p.write_text(f'[site]\nname = "site-{i}"\ntask = "{TASK}"\n[data]\nformat = "medmnist"\n'
                 f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\npartition = {i}\n'
                 f"num_partitions = {n}\n[compute]\nthreads = 1\n"
                 f"[security]\nrequire_secagg = false\n{security}")
    return p


def _context(site: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site)},
                   state=RecordDict(), run_config={})


def _train_message(cfg: RunConfig, server_round: int = 1) -> Message:
    model = build_model(cfg.task_config())
    content = RecordDict({wire.ARRAYS_KEY: wire.model_to_arrays(model),
                          wire.CONFIG_KEY: RoundInstructions.for_round(cfg, server_round)
                          .to_record()})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _rounds(run_dir: Path) -> list[dict[str, object]]:
    return list(json.loads((run_dir / "metrics.json").read_text())["rounds"])


# ------------------------------------------------------------------ keys and the bundle
def test_the_bundle_carries_no_coordinator_path_or_key(tmp_path: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pki = provision(tmp_path / "fed" / "pki", sites=["site-a"])
    fed = Federation.new(tmp_path / "fed", pki)
    fed.state.sites = {"site-a": SiteState("a.toml", TASK)}
    held = data_dir / "medmnist_breast" / "breastmnist.npz"
    cfg = RunConfig(task=TASK, min_sites=1, secagg=False, eval_format="medmnist",
                    eval_root=str(held), metrics_port=9999)
    app, run_dir = fed.prepare_run(cfg)
    text = (app / "pyproject.toml").read_text()
    app_config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    # every site receives this file: no path, key, held-out data or port of the coordinator
    for leak in (str(tmp_path), str(held), "signing", "artifact", "run-dir", "eval-root",
                 "metrics-port"):
        assert leak not in text
    assert all("/" not in str(v) for v in app_config.values())
    # the ServerApp finds its side under the runs folder its SuperLink was started with ...
    monkeypatch.setenv(RUNS_DIR_ENV, str(fed.runs_dir))
    server_side = read_server_side(str(app_config["run-name"]))
    assert server_side["run_dir"] == str(run_dir) and server_side["eval_root"] == str(held)
    assert server_side["artifact_key"] == str(pki.artifact_key)  # the app key never goes there
    assert str(pki.app_key) not in (run_dir / "server.json").read_text()
    rebuilt = RunConfig.from_flat(app_config | {k.replace("_", "-"): v
                                                for k, v in server_side.items()})
    assert rebuilt.eval_root == str(held) and rebuilt.task == TASK
    # ... and a run name that tries to climb out of it finds nothing
    assert read_server_side("../../etc") == {}


def _fab(app: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(app.rglob("*")):
            if f.is_file():
                z.writestr(str(f.relative_to(app)), f.read_bytes())
    return buf.getvalue()


def test_the_artifact_key_a_serverapp_holds_cannot_sign_an_app_sites_run(tmp_path: Path
                                                                          ) -> None:
    """Anyone who runs a ServerApp can read the artifact key; an app signed with it is
    refused by a site, which trusts only the app-signing key."""
    pki = provision(tmp_path / "pki", sites=[])
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pyproject.toml").write_text('[project]\nname = "evil"\n')
    (evil / "evil.py").write_text("import os; os.system('id')\n")
    sign_app(evil, pki.artifact_key)
    with pytest.raises(AuthError, match="does not trust"):
        verify_fab(_fab(evil), [pki.app_pub])
    sign_app(evil, pki.app_key)  # control: the key sites trust
    assert verify_fab(_fab(evil), [pki.app_pub])


def test_a_zip_bomb_bundle_is_refused_before_it_inflates(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("pyproject.toml", b"\0" * (64 * 2**20))  # 64 MiB of zeros, ~64 KiB zipped
    assert len(buf.getvalue()) < 2**20
    with pytest.raises(AuthError, match="inflates past"):
        verify_fab(buf.getvalue(), [])
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for i in range(300):
            z.writestr(f"f{i}", b"x")
    with pytest.raises(AuthError, match="300 files"):
        verify_fab(many.getvalue(), [])


def test_an_encrypted_ca_key_needs_its_passphrase(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CA_PASSPHRASE_ENV, "correct horse battery staple")
    pki = provision(tmp_path / "pki", sites=["site-a"])
    assert pki.ca_key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    monkeypatch.delenv(CA_PASSPHRASE_ENV)
    with pytest.raises(AuthError, match=CA_PASSPHRASE_ENV) as exc:
        issue_server_cert(pki, hosts=["fl.example.org"])
    assert exc.value.code == ExitCode.AUTH
    monkeypatch.setenv(CA_PASSPHRASE_ENV, "correct horse battery staple")
    issue_server_cert(pki, hosts=["fl.example.org"])


def test_a_revoked_site_key_is_neither_reissued_nor_registered(tmp_path: Path) -> None:
    pki = provision(tmp_path / "fed" / "pki", sites=["site-a", "site-b"])
    old = pki.site("site-b")
    moved = revoke_site_key(pki, "site-b")
    with pytest.raises(ConfigError, match="rotate-site site-b"):
        provision(pki.root, sites=["site-a", "site-b"])  # `federation up` would do this
    # the SuperLink is never asked to register a key from the revocation log
    fed = Federation.new(tmp_path / "fed", pki)
    revoked_keys = old.__class__("site-b", moved / "site-b.key", moved / "site-b.pub",
                                 old.ca_cert)
    with pytest.raises(AuthError, match="revoked"):
        fed.register(revoked_keys)
    # deliberately, it gets a new one, which registers like any other
    new = rotate_site_key(pki, "site-b")
    assert new.public_key.read_bytes() != (moved / "site-b.pub").read_bytes()
    provision(pki.root, sites=["site-a", "site-b"])  # its key exists again: nothing to refuse


# ------------------------------------------------------------------ the site's own policy
def test_site_ceilings_refuse_runs_beyond_them(tmp_path: Path, data_dir: Path) -> None:
    site = _site(tmp_path, data_dir, 0, 4, 'allowed_networks = ["resnet18"]\nmax_rounds = 2\n'
                                           "max_dp_epsilon = 4.0\n")
    base = {"task": TASK, "local_epochs": 1, "batch_size": 64, "secagg": False,
            "dp_clip": 10.0, "dp_epsilon": 2.0}
    attempts = {
        "network": (RunConfig(**(base | {"network": "densenet121"})), 1),  # type: ignore
        "rounds": (RunConfig(**base), 3),  # type: ignore[arg-type]
        "no dp": (RunConfig(**(base | {"dp_clip": 0.0})), 1),  # type: ignore[arg-type]
        "weak dp": (RunConfig(**(base | {"dp_epsilon": 8.0})), 1),  # type: ignore[arg-type]
    }
    for what, (cfg, server_round) in attempts.items():
        reply = client_app(_train_message(cfg, server_round), _context(site))
        assert reply.has_error(), what
        assert reply.error.code == ExitCode.POLICY
        reason = reply.error.reason
        assert reason.startswith("FP010 PolicyError")  # the rule broken stays in the site log
        assert not any(w in reason for w in ("allowed_networks", "densenet", "max_rounds",
                                             "epsilon 8"))
    ok = client_app(_train_message(RunConfig(**base), 2), _context(site))  # type: ignore
    assert not ok.has_error() and ok.content[wire.METRICS_KEY][wire.NUM_EXAMPLES] == 137


def test_error_replies_carry_a_code_and_a_type_never_a_path(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpacs.client.trainer as trainer

    def broken_disk(*_: object, **__: object) -> None:
        raise FileNotFoundError(2, "No such file or directory",
                                "/hospital/pacs-cache/1.2.840.113619.2.55.3/vol.npz")

    monkeypatch.setattr(trainer, "load_data", broken_disk)
    site = _site(tmp_path, data_dir, 0, 4)
    reply = client_app(_train_message(RunConfig(task=TASK, secagg=False)), _context(site))
    assert reply.has_error()
    assert reply.error.reason.startswith("FP001 FileNotFoundError: ")
    assert "/hospital" not in reply.error.reason and "1.2.840" not in reply.error.reason


# ------------------------------------------------------------------ what the server may do
def _cross_site_run(tmp_path: Path, data_dir: Path, *, local: bool,
                    consent: tuple[bool, ...]) -> dict[str, dict[str, object]]:
    sites = {i + 1: _site(tmp_path, data_dir, i, 3,
                          f"share_local_model = {str(c).lower()}\n")
             for i, c in enumerate(consent)}
    cfg = RunConfig(task=TASK, rounds=1, local_epochs=1, batch_size=64, min_sites=3,
                    secagg=False, cross_site=True, cross_site_local=local,
                    run_dir=str(tmp_path / f"run-{local}"))
    run_federation(LoopbackGrid(client_app, sites), cfg, Context(1, 0, {}, RecordDict(), {}))
    card = json.loads((Path(cfg.run_dir) / "final" / "model_card.json").read_text())
    return dict(card["cross_site"])


def test_cross_site_validation_ships_local_models_only_with_consent(
        tmp_path: Path, data_dir: Path) -> None:
    # by default only the global model travels, whatever the sites allow
    default = _cross_site_run(tmp_path, data_dir, local=False, consent=(True, True, True))
    assert set(default) == {"global"} and set(default["global"]) == {"site-0", "site-1",
                                                                     "site-2"}
    # asked for: site-2 never consented, so its model is not sent and it evaluates none
    mixed = _cross_site_run(tmp_path, data_dir, local=True, consent=(True, True, False))
    assert set(mixed) == {"global", "site-0", "site-1"}
    assert set(mixed["site-0"]) == set(mixed["site-1"]) == {"site-0", "site-1"}


def _claim_1e12(node: int) -> object:
    def tamper(nid: int, reply: Message) -> None:
        if nid != node:
            return
        for key, rec in reply.content.metric_records.items():
            if key in (wire.METRICS_KEY, "fitres.num_examples"):
                field = wire.NUM_EXAMPLES if key == wire.METRICS_KEY else "num_examples"
                if field in rec:
                    reply.content[key] = MetricRecord(dict(rec) | {field: 10**12})
    return tamper


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_a_site_claiming_1e12_examples_does_not_steer_the_model(
        tmp_path: Path, data_dir: Path, secagg: bool) -> None:
    sites = {i + 1: _site(tmp_path, data_dir, i, 3) for i in range(3)}
    cfg = RunConfig(task=TASK, rounds=1, local_epochs=1, batch_size=64, min_sites=3,
                    secagg=secagg, cross_site=False, run_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(client_app, sites, tamper=_claim_1e12(1))  # type: ignore[arg-type]
    if secagg:  # the run's one round changed nothing: the run fails, publishing nothing
        with pytest.raises(NoUpdateError, match="site-0 screened out: model update rejected"):
            run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    else:
        run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    r = _rounds(tmp_path / "run")[1]
    rejected = r["rejected"]
    assert isinstance(rejected, dict) and "num-examples" in str(rejected["site-0"])
    if secagg:  # the masked sum cannot drop one site: the whole aggregate is refused
        before, _ = load_model(str(tmp_path / "run" / "rounds" / "round-000" / "model.pt"))
        after, _ = load_model(str(tmp_path / "run" / "rounds" / "round-001" / "model.pt"))
        assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                     after.state_dict().values(), strict=True))
    else:  # the others are aggregated without it
        assert set(r["train_sites"]) == {"site-1", "site-2"}  # type: ignore[arg-type]


def test_a_site_replying_in_the_named_layout_is_dropped_and_the_round_goes_on(
        tmp_path: Path, data_dir: Path) -> None:
    """One site answers with its trained state as named arrays (the pre-packing layout)
    instead of one packed vector: the screen drops it with the reason, the others are
    averaged without it."""
    sites = {i + 1: _site(tmp_path, data_dir, i, 3) for i in range(3)}
    cfg = RunConfig(task=TASK, rounds=1, local_epochs=1, batch_size=64, min_sites=3,
                    secagg=False, cross_site=False, run_dir=str(tmp_path / "run"))
    reference = build_model(cfg.task_config()).state_dict()
    unpacked: list[int] = []

    def unpack_reply(nid: int, reply: Message) -> None:
        if nid != 1 or reply.metadata.message_type != MessageType.TRAIN:
            return
        arrays = reply.content.array_records[wire.ARRAYS_KEY]
        assert wire.is_packed(arrays)  # what the site really sent
        named = wire.arrays_to_numpy(arrays, reference)
        reply.content[wire.ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in named.items()})
        unpacked.append(nid)

    grid = LoopbackGrid(client_app, sites, tamper=unpack_reply)
    run_federation(grid, cfg, Context(1, 0, {}, RecordDict(), {}))
    assert unpacked == [1]
    r = _rounds(tmp_path / "run")[1]
    rejected = r["rejected"]
    assert isinstance(rejected, dict) and set(rejected) == {"site-0"}
    assert f"packed under {wire.PACKED_KEY!r}" in rejected["site-0"]
    assert f"got {len(reference)} named arrays" in rejected["site-0"]
    trained = r["train_sites"]
    assert isinstance(trained, dict) and set(trained) == {"site-1", "site-2"}


def test_a_task_may_not_ask_for_unbounded_memory() -> None:
    huge = TASK_PRESETS["hippocampus"].to_dict() | {"input_shape": [4096, 4096, 4096]}
    assert {e.field for e in validate_task_dict(huge, source_prefix="")} == {"input_shape"}
    wide = TASK_PRESETS["hippocampus"].to_dict() | {"width": 100_000, "num_classes": 10**6}
    assert {e.field for e in validate_task_dict(wide, source_prefix="")} == {"width",
                                                                          "num_classes"}


def test_pki_folder_layout_keeps_two_signing_keys(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    provision(tmp_path, sites=[])
    assert pki.app_key.is_file() and pki.artifact_key.is_file()
    assert pki.app_pub.read_bytes() != pki.artifact_pub.read_bytes()
