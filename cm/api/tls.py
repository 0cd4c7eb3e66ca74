"""TLS for the HTTP API's TCP port: the head's certificate, and the rule that only loopback may go without.

The certificate is the site's (``CM_API_CERT`` and ``CM_API_KEY``) or one the
head makes at its first start with a TCP port: a self-signed certificate
(EC P-256, ten years) for the head's names and addresses, ``RUN_DIR/api.crt``
(0644: every user's client verifies the head against it) with its key in
``RUN_DIR/keys/api.key`` (0600 in the 0700 keys folder). A client that has
the certificate file talks to this head and nobody else, and nothing it sends
is readable on the wire (docs/SECURITY.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cm.config import ConfigError, Settings

CERT_FILE = "api.crt"
KEY_FILE = "api.key"
VALID_DAYS = 3650


def cert_file(settings: Settings) -> Path:
    """The certificate the API's TCP port serves, which clients verify it with: the site's, else the head's."""
    return Path(settings.api_cert) if settings.api_cert else Path(settings.run_dir) / CERT_FILE


def cert_paths(settings: Settings) -> tuple[Path, Path]:
    """(certificate, key) the API's TCP port serves: the site's, else the head's own."""
    if bool(settings.api_cert) != bool(settings.api_key):
        raise ConfigError("give both CM_API_CERT and CM_API_KEY, or neither (the head then makes its own)")
    if settings.api_key:
        return Path(settings.api_cert), Path(settings.api_key)
    from cm.keys import keys_dir  # here: clients need cert_file() alone, without zmq

    return cert_file(settings), keys_dir(settings.run_dir) / KEY_FILE


def is_loopback(host: str) -> bool:
    """True when every address host names is a loopback one (an unresolvable name is not)."""
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_binding(settings: Settings) -> None:
    """Refuse a TCP port without TLS anywhere but on loopback: bearer tokens would cross the network in clear."""
    if settings.api_port and not settings.api_tls and not is_loopback(settings.api_host):
        raise ConfigError(f"CM_API_HOST={settings.api_host} is not a loopback address and CM_API_TLS is off: "
                          "bearer tokens would cross the network in clear. Turn CM_API_TLS on (the default) "
                          "or bind CM_API_HOST to 127.0.0.1")


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the API's TCP port (the head's own certificate made first if need be)."""
    cert, key = cert_paths(settings)
    if not (settings.api_cert or cert.exists()):
        make_certificate(cert, key, names(settings))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the API's certificate {cert} and key {key}: {exc}") from None
    return context


def client_context(cafile: str | Path) -> ssl.SSLContext:
    """What cm.Client verifies a head with: its certificate file (or the site's CA) and the host name."""
    return ssl.create_default_context(cafile=str(cafile))


def names(settings: Settings) -> list[str]:
    """Every name and address a client may use to reach this head."""
    found = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(), settings.head_host]
    if settings.api_host not in ("", "0.0.0.0", "::"):
        found.append(settings.api_host)
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)]
    except socket.gaierror:
        pass
    return list(dict.fromkeys(n for n in found if n))


def make_certificate(cert: Path, key: Path, hostnames: list[str]) -> None:
    """A self-signed certificate for hostnames (names and IP addresses), its key readable by root alone."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cm head")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key.parent.mkdir(parents=True, exist_ok=True)
    key.parent.chmod(0o700)
    _write(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), 0o600)
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """data into path, whole or not at all, made with mode (never wider for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)
