"""Test-wide guards: no test reaches outside this machine, and no library phones home."""

import ipaddress
import os
import socket

import pytest

# Set before any Hugging Face library is imported by a test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"


class OutboundConnectionBlocked(ConnectionError):
    """A test tried to reach an address outside 127.0.0.0/8."""


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like never leave the machine
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a host name: resolving it would already be a network request
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if not _is_local(address):
        raise OutboundConnectionBlocked(f"test tried to connect to {address!r}; only 127.0.0.0/8 is allowed")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise OutboundConnectionBlocked(f"test tried to connect to {address!r}; only 127.0.0.0/8 is allowed")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local((host if isinstance(host, str) else host.decode(), 0)):
        raise OutboundConnectionBlocked(f"test tried to resolve {host!r}; only 127.0.0.0/8 is allowed")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture(scope="session")
def tiny_sd1():
    """One seeded tiny SD1 pipeline shared by read-only tests."""
    from privdiff.models.tiny import TinySpec, tiny_pipeline

    pipe = tiny_pipeline(spec=TinySpec(family="sd1"), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def load_bench():
    """Import a script of bench/ by name (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
