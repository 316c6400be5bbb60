from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedpacs.common.errors import ConfigError
from fedpacs.server.coordinator.pki import (
    Pki,
    cert_hosts,
    create_signing_keys,
    create_site_key,
    missing_hosts,
    provision,
    revoke_site_key,
    revoked,
    rotate_site_key,
)


def test_provision_creates_verifiable_tls_and_site_keys(tmp_path: Path) -> None:
    pki = provision(tmp_path / "pki", sites=["site-a", "site-b"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name in ("site-a", "site-b"):
        keys = pki.site(name)
        priv = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
        pub = load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        assert priv.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
        assert keys.private_key.stat().st_mode & 0o077 == 0  # private: owner only
        assert keys.ca_cert.read_bytes() == pki.ca_cert.read_bytes()
    assert pki.site_names() == ["site-a", "site-b"]


def test_rerun_keeps_keys_and_add_site_touches_no_other(tmp_path: Path) -> None:
    pki = provision(tmp_path, sites=["site-a"])
    before = pki.site("site-a").private_key.read_bytes()
    ca_before = pki.ca_cert.read_bytes()
    provision(tmp_path, sites=["site-a"])
    create_site_key(Pki(tmp_path), "site-c")
    assert pki.site("site-a").private_key.read_bytes() == before
    assert pki.ca_cert.read_bytes() == ca_before
    assert pki.site_names() == ["site-a", "site-c"]


def test_bad_site_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        provision(tmp_path, sites=["Site A/../x"])
    assert "lower-case" in str(exc.value)


def test_revoke_and_rotate_touch_one_site_only(tmp_path: Path) -> None:
    pki = provision(tmp_path, sites=["site-a", "site-b"])
    a_before = pki.site("site-a").private_key.read_bytes()
    b_pub = pki.site("site-b").public_key.read_text().strip()
    moved = revoke_site_key(pki, "site-b")
    assert pki.site_names() == ["site-a"]
    assert (moved / "site-b.pub").read_text().strip() == b_pub  # kept for the record
    assert [r["site"] for r in revoked(pki)] == ["site-b"]
    assert revoked(pki)[0]["public_key"] == b_pub
    keys = rotate_site_key(pki, "site-a")
    assert keys.private_key.read_bytes() != a_before
    assert pki.site_names() == ["site-a"] and len(revoked(pki)) == 2
    with pytest.raises(ConfigError) as exc:
        revoke_site_key(pki, "site-b")  # already revoked
    assert "provisioned site" in str(exc.value)


def test_a_site_folder_holds_what_the_hospital_needs_and_nothing_else(tmp_path: Path) -> None:
    """PKI/sites/NAME/ is handed to the hospital: its own key pair, the CA and the
    coordinator's app-signing public key; never another site's key or a coordinator key."""
    pki = provision(tmp_path / "pki", sites=["site-a", "site-b"], hosts=["10.77.0.1"])
    for name, other in (("site-a", "site-b"), ("site-b", "site-a")):
        keys = pki.site(name)
        files = {p.name for p in keys.folder.rglob("*")}
        assert files == {f"{name}.key", f"{name}.pub", "ca.pem", "trusted-app.pub"}
        assert keys.trusted_app_key.read_bytes() == pki.app_pub.read_bytes()
        assert keys.ca_cert.read_bytes() == pki.ca_cert.read_bytes()
        contents = b"".join(p.read_bytes() for p in keys.folder.iterdir())
        for secret in (pki.site(other).private_key, pki.site(other).public_key, pki.ca_key,
                       pki.server_key, pki.app_key, pki.artifact_key):
            assert secret.read_bytes().strip() not in contents
    # a site added later; and every folder gets a new app key (`provision signing-keys`)
    create_site_key(pki, "site-c")
    assert {p.name for p in pki.site("site-c").folder.iterdir()} == {
        "site-c.key", "site-c.pub", "ca.pem", "trusted-app.pub"}
    pki.app_key.unlink()
    create_signing_keys(pki)
    assert all(pki.site(n).trusted_app_key.read_bytes() == pki.app_pub.read_bytes()
               for n in ("site-a", "site-b", "site-c"))


def test_provision_adds_a_host_to_the_superlink_certificate_from_the_same_ca(
        tmp_path: Path) -> None:
    pki = provision(tmp_path / "pki", sites=["site-a"])
    ca_before = pki.ca_cert.read_bytes()
    key_before = pki.site("site-a").private_key.read_bytes()
    assert missing_hosts(pki, ["10.77.0.1", "coord.example"]) == ["10.77.0.1", "coord.example"]
    provision(tmp_path / "pki", sites=[], hosts=["10.77.0.1", "coord.example"])
    assert missing_hosts(pki, ["10.77.0.1", "coord.example", "localhost", "127.0.0.1"]) == []
    assert set(cert_hosts(pki.server_cert)) == {"localhost", "127.0.0.1", "10.77.0.1",
                                               "coord.example"}
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert pki.ca_cert.read_bytes() == ca_before  # sites keep trusting the SuperLink
    assert pki.site("site-a").private_key.read_bytes() == key_before
    cert_before = pki.server_cert.read_bytes()
    provision(tmp_path / "pki", sites=[], hosts=["coord.example"])  # nothing missing
    assert pki.server_cert.read_bytes() == cert_before


def test_provision_cli_says_which_folder_goes_to_which_hospital(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpacs.deploy.cli import main

    assert main(["provision", "init", "--dir", str(tmp_path / "pki"), "--site", "hospital-a",
                 "--host", "10.77.0.1"]) == 0
    out = capsys.readouterr().out
    assert f"give {tmp_path / 'pki' / 'sites' / 'hospital-a'}/ to the hospital" in out
    assert "10.77.0.1" in out and "federation register hospital-a" in out
