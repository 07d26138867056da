"""The split client's noise secret and its ledger of what it has sent (DESIGN.md 3.1, THREAT_MODEL.md).

Hardened split learning hides an image only while the server cannot predict the client's noise
(timestep, ε, label noise, hint noise). Every draw therefore comes from a 256-bit secret made by the
OS, stored beside the client's key and never sent: draws are keyed on the secret and on the image's
*content* (a keyed hash of its pixels and hint), never on a number a person types or a position the
wire reveals. Draws that must repeat (one noising per image for a whole run, batches re-sent after
a reconnect or a resume) repeat because the same secret and content give the same stream.

A second, *different* noising of an image gives its latent away (two equations in z0 and ε), and
it can escape in many ways: the same image sent again under another snr_bound or σ, in a second job,
after the folder was reordered, or after the secret was lost and remade. So the client keeps a
ledger (SQLite, beside the secret) of every image it has sent: the settings it was sent under and a
hash of each message. It refuses, before anything is sent, to send an image under other settings or
as a different message, and it refuses to make a new secret while the ledger shows sent images.
Losing both files loses that protection: keep them together, and back them up with the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ..errors import public_name

SECRET_SUFFIX = ".split-secret"
LEDGER_SUFFIX = ".split-ledger.sqlite"
_FORMAT = "privdiff-split-secret"


@public_name
class SplitPrivacyError(ValueError):
    """Sending would give the server a second, different noising of an image (or the secret is lost)."""


@dataclass(frozen=True, repr=False)
class ClientSecret:
    """256 secret bits; every draw, id and order the client derives from an image is keyed on them."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != 32:
            raise ValueError("a split client secret is 32 bytes (256 bits from the OS).")

    def __repr__(self) -> str:  # never print the key
        return "ClientSecret(<hidden>)"

    @classmethod
    def generate(cls) -> "ClientSecret":
        return cls(os.urandom(32))

    def _mac(self, *parts: bytes) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "little"))
            mac.update(part)
        return mac.digest()

    def image_id(self, content: bytes) -> str:
        """An image's id (hex): a keyed hash of its content hash, so the ledger alone tells nobody
        which images were sent, and the id never depends on where the image sits in a folder."""
        return self._mac(b"image", content).hex()

    def draws(self, *, image_id: str, draw: int) -> np.random.Generator:
        """The stream of one noising of one image (timestep, ε, hint and label noise)."""
        seed = int.from_bytes(self._mac(b"draw", bytes.fromhex(image_id), str(int(draw)).encode()), "little")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))

    def order_key(self, *, image_id: str, epoch: int) -> bytes:
        """Where an image goes in epoch `epoch`'s order (a secret shuffle, the same after a resume)."""
        return self._mac(b"order", bytes.fromhex(image_id), str(int(epoch)).encode())

    def batch_id(self, *, epoch: int, image_ids: Sequence[str]) -> str:
        """An opaque batch id: the same for a re-sent batch (so the server trains it once), and
        telling the server nothing of the images' positions or the dataset's size."""
        return self._mac(b"batch", str(int(epoch)).encode(), *(bytes.fromhex(i) for i in image_ids)).hex()[:32]


def content_hash(*, pixels, hint) -> bytes:
    """SHA-256 of an image and its hint as 8-bit pixels ([C, H, W] tensors in [-1, 1] and [0, 1])."""
    import torch

    digest = hashlib.sha256()
    for name, tensor, low in (("image", pixels, -1.0), ("hint", hint, 0.0)):
        values = tensor.detach().float().cpu()
        scaled = (values - low) / (1.0 - low) * 255.0
        quantised = scaled.round().clamp(0, 255).to(torch.uint8)
        digest.update(f"{name}{tuple(quantised.shape)}".encode())
        digest.update(quantised.numpy().tobytes())
    return digest.digest()


def secret_path(client_key: str | os.PathLike) -> Path:
    """Where a client's secret lives: beside its key, `<name>.split-secret`."""
    path = Path(client_key)
    return path.with_name(path.name.split(".")[0] + SECRET_SUFFIX)


def ledger_path(client_key: str | os.PathLike) -> Path:
    path = Path(client_key)
    return path.with_name(path.name.split(".")[0] + LEDGER_SUFFIX)


class SentLedger:
    """What this client has sent: per image, the settings it went under and each message's hash."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (image TEXT, draw INTEGER, settings TEXT, message TEXT, "
                        "PRIMARY KEY (image, draw))")

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(DISTINCT image) FROM sent").fetchone()[0])

    def check_settings(self, *, image_ids: Iterable[str], settings: dict) -> None:
        """Refuse (before anything is sent) if any of these images was sent under other settings."""
        wanted = _settings_text(settings)
        clashes: dict[str, int] = {}
        ids = list(image_ids)
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            rows = self.db.execute(f"SELECT DISTINCT image, settings FROM sent WHERE image IN "
                                   f"({','.join('?' * len(part))})", part).fetchall()
            for _, settings_text in rows:
                if settings_text != wanted:
                    clashes[settings_text] = clashes.get(settings_text, 0) + 1
        if clashes:
            earlier, count = max(clashes.items(), key=lambda item: item[1])
            raise SplitPrivacyError(
                f"{sum(clashes.values())} of these images were already sent to a split server under other settings "
                f"({_describe_change(json.loads(earlier), settings)}); a second, different noising of an image lets "
                "the server solve for it. Nothing was sent. Use the settings they were sent with, or other images.")

    def check_and_record(self, *, entries: Sequence[tuple[str, int, str]], settings: dict) -> None:
        """Before a batch is sent: each (image, draw, message hash) must be new or exactly the message
        sent before; new ones are recorded first (a crash after this and before the send is harmless:
        the retry sends the identical message)."""
        wanted = _settings_text(settings)
        rows = []
        for image, draw, message in entries:
            found = self.db.execute("SELECT settings, message FROM sent WHERE image = ? AND draw = ?",
                                    (image, int(draw))).fetchone()
            if found is None:
                rows.append((image, int(draw), wanted, message))
            elif found != (wanted, message):
                raise SplitPrivacyError(
                    "an image of this batch was sent before as a different message (another model, device or "
                    "setting gives another latent under the same noise, and the two messages together give the "
                    "image away); nothing of this batch was sent. Encode with the same model and settings as before.")
        if rows:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO sent VALUES (?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _describe_change(before: dict, now: dict) -> str:
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed) or "another message"


def open_client_secret(*, path: str | os.PathLike, ledger: SentLedger) -> ClientSecret:
    """The client's secret at `path`, made (256 bits from the OS, owner-only file) on first use. A
    missing secret is remade only while the ledger shows nothing sent: remaking it after images were
    sent would give each of them a second noising, so that is refused."""
    path = Path(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError("not a privdiff split secret")
            return ClientSecret(bytes.fromhex(data["key"]))
        except (ValueError, KeyError, TypeError) as error:
            raise SplitPrivacyError(f"{path} is not a readable split secret ({error}); restore it from your backup. "
                                    "Making a new one would give already-sent images a second noising.") from None
    sent = ledger.count()
    if sent:
        raise SplitPrivacyError(
            f"the noise secret {path} is missing, but its ledger {ledger.path} shows {sent} image(s) already sent: a "
            "new secret would give each of them a second, different noising, which lets the server solve for them. "
            "Restore the secret from your backup (it lives beside the client key). Nothing was sent.")
    secret = ClientSecret.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": _FORMAT, "key": secret.key.hex(),
                   "note": "privdiff split-learning noise secret: never share it, never delete it while its "
                           "ledger exists; back it up with the client key"}, f)
        f.flush()
        os.fsync(f.fileno())
    return secret


def load_client_secret(path: str | os.PathLike) -> ClientSecret:
    """The secret at `path` (made on first use, as `open_client_secret` makes it), checked against its own
    ledger and the ledger closed again: for previews and audits, which send nothing."""
    ledger = SentLedger(ledger_path(path))
    try:
        return open_client_secret(path=path, ledger=ledger)
    finally:
        ledger.close()
