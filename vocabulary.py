"""One name per concept across the CLI, the nodes, the configs and Flower run configs.

A config field, a node input and a run-config key share one name (`clip_norm`; `clip-norm` in a
run config, `--clip-norm` on the command line). Names a concept had before are read for one more
release with a one-line notice, then dropped. Outside the layers, like `errors` and `console`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

# Current name -> the names it replaces.
FORMER_NAMES: Mapping[str, tuple[str, ...]] = {
    "clip_norm": ("max_grad_norm", "clip"),  # the L2 clipping bound C (per example, or per DPAgg unit)
    "local_clip_norm": ("local_max_grad_norm",),  # a federated client's own DP-SGD bound
    "client_clip_norm": ("client_dp_clipping_norm", "client_dp_clip"),  # client-level DP: update bound
    "client_noise_multiplier": ("client_dp_noise_multiplier", "client_dp_noise"),
    "client_delta": ("client_dp_delta",),
    "num_clients": ("clients",),
    "learning_rate": ("lr",),
}

# The command line's former flags, each with its replacement.
FORMER_FLAGS: Mapping[str, str] = {
    "--max-grad-norm": "--clip-norm",
    "--clip": "--clip-norm",
    "--client-dp-clip": "--client-clip-norm",
    "--client-dp-noise": "--client-noise-multiplier",
    "--client-dp-delta": "--client-delta",
    "--clients": "--num-clients",
    "--lr": "--learning-rate",
}

_logger = logging.getLogger("privdiff")


def former_notice(old: str, new: str) -> str:
    return f"{old} is the former name of {new}; it is read in this release only: use {new}."


def current_names(values: Mapping, *, known, where: str, notice: bool = True) -> dict:
    """`values` (settings read from a file or a run config, keys with '_' or '-') with former names
    moved to the current ones that `known` holds; each move logs one notice (`notice`). Giving both names is an
    error, since they could disagree."""
    hyphens = any("-" in str(key) for key in values)
    out = dict(values)
    for new, olds in FORMER_NAMES.items():
        key_new = new.replace("_", "-") if hyphens else new
        if new not in known:
            continue
        for old in olds:
            key_old = old.replace("_", "-") if hyphens else old
            if key_old not in out:
                continue
            if key_new in out:
                raise ValueError(f"{where}: both {key_old!r} and {key_new!r} are given; they name one setting, "
                                 f"keep {key_new!r}.")
            out[key_new] = out.pop(key_old)
            if notice:
                _logger.warning("%s: %s", where, former_notice(repr(key_old), repr(key_new)))
    return out


def legacy_repr(config, *, renamed: Mapping[str, str]) -> str:
    """The dataclass repr of `config` under the field names it had before a rename (`renamed`: current
    -> former). Checkpoints fingerprint a run by that repr, so a run started before the rename resumes."""
    from dataclasses import fields

    parts = [f"{renamed.get(f.name, f.name)}={getattr(config, f.name)!r}" for f in fields(config) if f.repr]
    return f"{type(config).__qualname__}({', '.join(parts)})"
