"""Provisioning with ``cryptography``: a federation CA, the SuperLink's TLS certificate and
one authentication key pair per site.

Layout of a PKI folder::

    PKI/ca.pem, ca.key                 federation CA (keep ca.key offline in production)
    PKI/superlink.pem, superlink.key   SuperLink TLS (SAN localhost, 127.0.0.1 + extras)
    PKI/sites/NAME/NAME.key            site's SuperNode auth key (OpenSSH, ECDSA P-384)
    PKI/sites/NAME/NAME.pub            its public key, registered with the SuperLink
    PKI/sites/NAME/ca.pem              the CA the site uses to verify the SuperLink
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpacs.common.errors import AuthError, ConfigError, FieldError
from fedpacs.common.signing import generate_signing_key, write_private

SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CERT_DAYS = 825


@dataclass(frozen=True)
class SiteKeys:
    name: str
    private_key: Path
    public_key: Path
    ca_cert: Path


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing.pub"

    def site(self, name: str) -> SiteKeys:
        d = self.root / "sites" / name
        return SiteKeys(name, d / f"{name}.key", d / f"{name}.pub", d / "ca.pem")

    def site_names(self) -> list[str]:
        d = self.root / "sites"
        return sorted(p.name for p in d.iterdir() if (p / f"{p.name}.pub").is_file()) \
            if d.is_dir() else []


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(pki: Pki, *, common_name: str = "fedpacs federation CA") -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(pki.ca_key, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    _write_public(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthError(f"{pki.root}: cannot read the CA ({type(exc).__name__}: {exc}). "
                        "Fix: run `fedpacs provision init` to create it") from exc
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, cert


def issue_server_cert(pki: Pki, *, hosts: list[str]) -> None:
    """TLS certificate for the SuperLink, with every host as a SAN (IPs as IP SANs)."""
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(pki.server_key, key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    _write_public(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def check_site_name(name: str) -> None:
    if not SITE_NAME_RE.match(name):
        raise ConfigError("site name", [FieldError(
            "site", "lower-case letters, digits and '-', starting with a letter or digit "
            "(max 63)", repr(name), 'use a name such as "hospital-a"')])


def create_site_key(pki: Pki, name: str) -> SiteKeys:
    """A new ECDSA P-384 key pair for one site's SuperNode (OpenSSH format, as Flower reads)."""
    check_site_name(name)
    site = pki.site(name)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(site.private_key, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    _write_public(site.public_key, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    if pki.ca_cert.is_file():
        shutil.copyfile(pki.ca_cert, site.ca_cert)
    return site


def provision(root: Path, *, sites: list[str], hosts: list[str] | None = None,
              force: bool = False) -> Pki:
    """Create what is missing (or everything, with ``force``): CA, SuperLink cert, site keys,
    and the coordinator's Ed25519 key that signs model artifacts."""
    for s in sites:
        check_site_name(s)
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    if force or not (pki.ca_cert.is_file() and pki.ca_key.is_file()):
        create_ca(pki)
        force = True  # a new CA invalidates the old server certificate
    if force or not pki.server_cert.is_file():
        issue_server_cert(pki, hosts=["localhost", "127.0.0.1", *(hosts or [])])
    if force or not pki.signing_key.is_file():
        generate_signing_key(pki.signing_key)
    for s in sites:
        keys = pki.site(s)
        if force or not keys.private_key.is_file():
            create_site_key(pki, s)
        elif pki.ca_cert.is_file():
            shutil.copyfile(pki.ca_cert, keys.ca_cert)
    return pki


REVOKED_FILE = "revoked.json"


def revoked(pki: Pki) -> list[dict[str, str]]:
    """The revocation log: every site key taken out of service, newest last."""
    path = pki.root / REVOKED_FILE
    return list(json.loads(path.read_text())) if path.is_file() else []


def revoke_site_key(pki: Pki, name: str) -> Path:
    """Take one site's key out of service: its files move to ``revoked/NAME-STAMP/`` and
    the revocation log records its public key. Other sites are untouched. (A running
    SuperLink must also forget the node: see LocalFederation.revoke.)"""
    check_site_name(name)
    site = pki.site(name)
    if not site.public_key.is_file():
        raise ConfigError(str(pki.root), [FieldError(
            "site", f"a provisioned site ({', '.join(pki.site_names()) or 'none'})",
            repr(name), "check the name; `fedpacs provision add-site NAME` creates keys")])
    stamp = _now().strftime("%Y%m%dT%H%M%S%f")
    dest = pki.root / "revoked" / f"{name}-{stamp}"
    dest.mkdir(parents=True)
    public = site.public_key.read_text().strip()
    for f in (site.private_key, site.public_key):
        if f.is_file():
            shutil.move(str(f), dest / f.name)
    log = revoked(pki) + [{"site": name, "public_key": public, "revoked_at": _now().isoformat(),
                           "moved_to": str(dest)}]
    (pki.root / REVOKED_FILE).write_text(json.dumps(log, indent=1))
    return dest


def rotate_site_key(pki: Pki, name: str) -> SiteKeys:
    """Revoke one site's key and issue it a new one; other sites are untouched."""
    revoke_site_key(pki, name)
    return create_site_key(pki, name)
