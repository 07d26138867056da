"""Deployment helpers: TLS material for a Flower SuperLink and authentication keys for SuperNodes.

A real federation runs Flower's own processes (DESIGN.md 3.4): one `flower-superlink` (TLS, SuperNode
authentication on) and one `flower-supernode` per site, each with its key registered at the SuperLink;
`flwr run federated/privdiff-fed <connection>` starts a run. privdiff only makes the files they need:
a CA and a server certificate for the SuperLink's address, and ECDSA P-384 node keys in OpenSSH format
(what Flower 1.41 accepts). For production use your own CA; keys are written readable by the owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path


def _write(path: Path, data: bytes, *, secret: bool) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} exists; privdiff does not overwrite keys. Remove it or choose another folder.")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


TLS_FILES = ("ca.crt", "server.pem", "server.key")


def _check_node_name(name: str) -> None:
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ValueError(f"node name {name!r} must be a plain file name (letters, digits, '-', '_'), e.g. site-a.")


def check_certs_request(*, folder: str | os.PathLike, nodes=(), hosts=("localhost",)) -> None:
    """Everything `fed certs` will write, checked first, so that a refusal leaves no file behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file; give a folder.")
    if not hosts:
        raise ValueError("--hosts: give at least one name or address the SuperLink is reached at.")
    for name in nodes:
        _check_node_name(name)
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"--nodes {' '.join(nodes)}: each site needs its own name.")
    targets = [*TLS_FILES, *(f for name in nodes for f in (name, f"{name}.pub"))]
    existing = [name for name in targets if (folder / name).exists()]
    if existing:
        raise FileExistsError(f"{folder / existing[0]} exists; privdiff does not overwrite keys. Remove it or choose "
                              "another folder.")


def create_tls_material(*, folder: str | os.PathLike, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                        days: int = 365) -> dict[str, Path]:
    """A CA (`ca.crt`) and a server certificate and key for the SuperLink (`server.pem`, `server.key`),
    valid for `hosts` (names or IP addresses). SuperNodes and `flwr` trust `ca.crt`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privdiff federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(folder / "ca.crt", ca_cert.public_bytes(pem), secret=False),
        "certificate": _write(folder / "server.pem", server_cert.public_bytes(pem), secret=False),
        "key": _write(folder / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), secret=True),
    }


def create_node_key(*, folder: str | os.PathLike, name: str) -> dict[str, Path]:
    """A SuperNode's authentication key pair: `<name>` (private, for `--auth-supernode-private-key`)
    and `<name>.pub` (for `flwr supernode register <name>.pub <connection>`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_node_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    return {
        "private": _write(folder / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()), secret=True),
        "public": _write(folder / f"{name}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), secret=False),
    }
