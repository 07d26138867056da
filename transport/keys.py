"""CurveZMQ key pairs: one for the server, one per client, and the server's allowlist of client keys.

`create_keys(folder=..., name=...)` writes ZeroMQ's certificate files: `<name>.key` (public, safe to
share) and `<name>.key_secret` (keep it; readable by its owner only). A server admits exactly the
clients whose public `.key` files lie in its allowlist folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def create_keys(*, folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Create `<name>.key` and `<name>.key_secret` in `folder`; refuses to overwrite a key."""
    import zmq.auth

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name={name!r} must be a plain file name such as 'server' or 'client-1'.")
    folder = Path(folder)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise FileExistsError(f"{public} or {secret} already exists; pick another name or remove the old pair.")
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return public, secret


def load_keys(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; secret is None for a public-only `.key` file."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no key file at {path}; create one with `privdiff split keys`.")
    return zmq.auth.load_certificate(str(path))
