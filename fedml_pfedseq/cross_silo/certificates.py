"""A federation's certificates: one CA, and one certificate per party that names its rank (mutual TLS).

Every party is both a gRPC server (it listens for messages) and a gRPC client (it sends them), so each certificate
serves both ways. Its subject alternative name is the party's identity, ``party-<rank>``: a sender reaches rank r
only if the listener proves ``party-r``, and a listener accepts a message whose header says "from rank k" only from
a peer whose certificate proves ``party-k`` (grpc_transport.py). Keys are ECDSA P-256, written readable by their
owner only.

``pfedseq certs DIR --clients N`` issues them (a CA in DIR unless one is there, then every party's missing
certificate); ``pfedseq deploy`` issues a throw-away set inside its run folder.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
IDENTITY = re.compile(r"party-(\d+)")


def party_identity(rank: int | str) -> str:
    return f"party-{rank}"


def rank_of(identity: str) -> int | None:
    """The rank an identity names (``party-3`` -> 3), None for any other name."""
    match = IDENTITY.fullmatch(identity)
    return int(match.group(1)) if match else None


def rank_path(template: str, rank: int) -> Path:
    """A recipe's per-party path (``comm_args.party_cert`` / ``party_key``) for party ``rank``: ``{rank}`` replaced."""
    return Path(template.replace("{rank}", str(rank)))


def party_files(folder: Path, rank: int | str) -> tuple[Path, Path]:
    """Where party ``rank``'s certificate and key are kept in a folder that ``issue_federation`` wrote (``rank``
    "{rank}": the recipe's per-party template)."""
    return folder / f"{party_identity(rank)}.crt", folder / f"{party_identity(rank)}.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, days: int, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def issue_ca(folder: Path, name: str = "pfedseq federation CA", days: int = 365) -> None:
    """A new CA in ``folder`` (ca.crt to give every party, ca.key to keep)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(folder / CA_KEY, key)
    (folder / CA_CERT).write_bytes(_certificate(name, key, None, key, days, ca=True)
                                   .public_bytes(serialization.Encoding.PEM))


def issue_party(folder: Path, rank: int, days: int = 365) -> tuple[Path, Path]:
    """Party ``rank``'s key and certificate, signed by the CA in ``folder``; returns their paths."""
    ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    cert_path, key_path = party_files(folder, rank)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(key_path, key)
    cert = _certificate(party_identity(rank), key, ca_cert.subject, ca_key, days, ca=False)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_federation(folder: Path, num_clients: int, days: int = 365) -> list[int]:
    """A CA in ``folder`` unless one is there, then a certificate for every party (rank 0 the server, 1..N the
    clients) that has none; returns the ranks issued."""
    if not (folder / CA_CERT).is_file():
        issue_ca(folder, days=days)
    missing = [r for r in range(num_clients + 1) if not all(p.is_file() for p in party_files(folder, r))]
    for rank in missing:
        issue_party(folder, rank, days)
    return missing
