"""Provisioning with ``cryptography``: a federation CA, the SuperLink's TLS certificate and
one authentication key pair per site.

Layout of a PKI folder::

    PKI/ca.pem, ca.key                 federation CA (ca.key encrypted with
                                       $FEDPACS_CA_PASSPHRASE when set; keep it offline)
    PKI/superlink.pem, superlink.key   SuperLink TLS (SAN localhost, 127.0.0.1 + extras)
    PKI/sites/NAME/NAME.key            site's SuperNode auth key (OpenSSH, ECDSA P-384)
    PKI/sites/NAME/NAME.pub            its public key, registered with the SuperLink
    PKI/sites/NAME/ca.pem              the CA the site uses to verify the SuperLink
    PKI/sites/NAME/trusted-app.pub     the coordinator's app-signing public key (the site's
                                       security.trusted_app_keys); PKI/sites/NAME/ is what
                                       the hospital gets, and holds no other site's key
    PKI/app-signing.key, .pub          signs the apps sites run (used by `run start` only;
                                       sites trust the .pub); never reaches a ServerApp
    PKI/artifact-signing.key, .pub     signs each run's artifacts (the ServerApp signs the
                                       manifest; researchers verify with the .pub)
    PKI/revoked.json, revoked/         retired site keys (never re-issued silently)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
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

CA_PASSPHRASE_ENV = "FEDPACS_CA_PASSPHRASE"
SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CERT_DAYS = 825
TRUSTED_APP_KEY = "trusted-app.pub"  # in each site folder: a copy of PKI/app-signing.pub
LOCAL_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class SiteKeys:
    name: str
    private_key: Path
    public_key: Path
    ca_cert: Path

    @property
    def folder(self) -> Path:
        return self.private_key.parent

    @property
    def trusted_app_key(self) -> Path:
        return self.folder / TRUSTED_APP_KEY


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
    def app_key(self) -> Path:
        return self.root / "app-signing.key"

    @property
    def app_pub(self) -> Path:
        return self.root / "app-signing.pub"

    @property
    def artifact_key(self) -> Path:
        return self.root / "artifact-signing.key"

    @property
    def artifact_pub(self) -> Path:
        return self.root / "artifact-signing.pub"

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
    passphrase = os.environ.get(CA_PASSPHRASE_ENV, "").encode()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    write_private(pki.ca_key, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8, encryption))
    _write_public(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    passphrase = os.environ.get(CA_PASSPHRASE_ENV, "").encode() or None
    try:
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=passphrase)
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    except TypeError as exc:  # encrypted key, no passphrase (or the other way round)
        raise AuthError(f"{pki.ca_key}: expected the CA key's passphrase in "
                        f"${CA_PASSPHRASE_ENV}, got {'one' if passphrase else 'none'} that "
                        f"does not fit. Fix: export {CA_PASSPHRASE_ENV} (or mount the "
                        "offline CA) and run the command again") from exc
    except (OSError, ValueError) as exc:
        raise AuthError(f"{pki.root}: cannot read the CA ({type(exc).__name__}: {exc}). "
                        f"Fix: run `fedpacs provision init` to create it, or check "
                        f"${CA_PASSPHRASE_ENV}") from exc
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, cert


def _issue_cert(pki: Pki, *, hosts: list[str], cert_path: Path, key_path: Path) -> None:
    """A TLS server certificate from the federation CA, every host a SAN (IPs as IP SANs)."""
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
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def issue_server_cert(pki: Pki, *, hosts: list[str]) -> None:
    """TLS certificate for the SuperLink, with every host as a SAN (IPs as IP SANs)."""
    _issue_cert(pki, hosts=hosts, cert_path=pki.server_cert, key_path=pki.server_key)


def cert_hosts(cert_path: Path) -> list[str]:
    """The SANs of a TLS certificate: DNS names, then IPs ([] when it has none)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def missing_hosts(pki: Pki, hosts: list[str]) -> list[str]:
    """The ``hosts`` the SuperLink's certificate does not name (all when it is missing)."""
    have = cert_hosts(pki.server_cert) if pki.server_cert.is_file() else []
    return [h for h in hosts if not any(_same_host(h, x) for x in have)]


def share_with_site(pki: Pki, site: SiteKeys) -> None:
    """Copy what a hospital needs besides its key into its folder: the CA (to verify the
    SuperLink) and the app-signing public key (the apps it may run)."""
    if pki.ca_cert.is_file():
        shutil.copyfile(pki.ca_cert, site.ca_cert)
    if pki.app_pub.is_file():
        shutil.copyfile(pki.app_pub, site.trusted_app_key)


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
    share_with_site(pki, site)
    return site


def create_signing_keys(pki: Pki) -> Pki:
    """The coordinator's two Ed25519 keys (apps, artifacts), those missing; every site
    folder gets the app key's public half."""
    for key in (pki.app_key, pki.artifact_key):
        if not key.is_file():
            generate_signing_key(key)
    for s in pki.site_names():
        share_with_site(pki, pki.site(s))
    return pki


def provision(root: Path, *, sites: list[str], hosts: list[str] | None = None,
              force: bool = False) -> Pki:
    """Create what is missing (or everything, with ``force``): CA, SuperLink cert, site keys,
    and the coordinator's two Ed25519 keys (apps, artifacts). A host the SuperLink's
    certificate lacks gets it re-issued from the same CA with every old and new name (sites
    keep trusting it). A revoked site is not given a new key here (that takes `provision
    rotate-site`). Each site folder gets the CA and the app-signing public key."""
    for s in sites:
        check_site_name(s)
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    if force or not (pki.ca_cert.is_file() and pki.ca_key.is_file()):
        create_ca(pki)
        force = True  # a new CA invalidates the old server certificate
    wanted = [*LOCAL_HOSTS, *(hosts or [])]
    if force or missing_hosts(pki, wanted):
        have = [] if force or not pki.server_cert.is_file() else cert_hosts(pki.server_cert)
        names = [*have, *(h for h in wanted if not any(_same_host(h, x) for x in have))]
        issue_server_cert(pki, hosts=names)
    for key in (pki.app_key, pki.artifact_key):
        if force or not key.is_file():
            generate_signing_key(key)
    gone = {r["site"] for r in revoked(pki)}
    for s in sites:
        keys = pki.site(s)
        if not keys.private_key.is_file() and s in gone:
            raise ConfigError(str(pki.root), [FieldError(
                "site", "a site whose key was never revoked", f"{s!r} (revoked: see "
                f"{pki.root / REVOKED_FILE})", f"issue it a new key on purpose with `fedpacs "
                f"provision rotate-site {s}`, or pick another name")])
        if force or not keys.private_key.is_file():
            create_site_key(pki, s)
    for s in pki.site_names():  # every site folder: the current CA and app key
        share_with_site(pki, pki.site(s))
    return pki


REVOKED_FILE = "revoked.json"


def revoked(pki: Pki) -> list[dict[str, str]]:
    """The revocation log: every site key taken out of service, newest last."""
    path = pki.root / REVOKED_FILE
    return list(json.loads(path.read_text())) if path.is_file() else []


def revoke_site_key(pki: Pki, name: str) -> Path:
    """Take one site's key out of service: its files move to ``revoked/NAME-STAMP/`` and
    the revocation log records its public key. Other sites are untouched. (A running
    SuperLink must also forget the node: see Federation.revoke.)"""
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


def is_revoked(pki: Pki, public_key: Path) -> bool:
    """True when this public key was taken out of service (the revocation log)."""
    text = public_key.read_text().strip() if public_key.is_file() else ""
    return any(r.get("public_key") == text for r in revoked(pki))


def rotate_site_key(pki: Pki, name: str) -> SiteKeys:
    """Revoke one site's key (if it still has one) and issue it a new one; other sites are
    untouched. This is also how a site revoked earlier is let back in, on purpose."""
    if pki.site(name).public_key.is_file():
        revoke_site_key(pki, name)
    return create_site_key(pki, name)


def issue_tls_cert(pki: Pki, *, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """A TLS server certificate from the federation CA for another service (e.g. the model
    registry): ``PKI/NAME.pem`` and ``PKI/NAME.key`` (mode 600), every host a SAN (IPs as IP
    SANs). Returns (certificate, key)."""
    errs = []
    taken = ("ca", "superlink", "signing", "app-signing", "artifact-signing")
    if not SITE_NAME_RE.match(name) or name in taken:
        errs.append(FieldError("name", f"lower-case letters, digits and '-', not one of "
                               f"{', '.join(taken)}", repr(name),
                               'use a service name such as "registry"'))
    if not hosts:
        errs.append(FieldError("hosts", "at least one host name or IP", "none",
                               "pass the names researchers connect to, e.g. registry.example.org"))
    if errs:
        raise ConfigError("TLS certificate", errs)
    cert_path, key_path = pki.root / f"{name}.pem", pki.root / f"{name}.key"
    _issue_cert(pki, hosts=hosts, cert_path=cert_path, key_path=key_path)
    return cert_path, key_path
