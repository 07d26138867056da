"""The privacy record every released artifact carries, and atomic writers that attach it.

A ``.safetensors`` file stores the record as a JSON string under the metadata key
``privdiff_privacy``; any other file (A1111 ``.pt`` embeddings, PNG previews, ...) gets a sidecar
``<file>.privacy.json``. ``read_record`` finds either.

Mechanisms and what their records must hold (DESIGN.md section 5):

=======================  ===============================================================================
``dp-sgd``               DP-LDM, DP-SGD Textual Inversion, local DP in federated clients: finite ε > 0,
                         0 < δ < 1, σ > 0, C > 0, q in (0, 1], steps >= 1, N >= 1, accountant
``gaussian-aggregate``   DPAgg-TI: the same fields with steps = 1
``dp-fedavg``            client-level DP: q = clients sampled per round / clients, steps = rounds,
                         num_examples = clients, privacy_unit ``"client"``
``split-hardened``,      split learning: no ε (it is not a DP mechanism); the noise settings and the
``split-paper``          measured attack figures go in ``extra``
``none``                 public artifacts: no DP fields at all
=======================  ===============================================================================

Every DP record states its ``adjacency``: ``add-remove`` (neighbouring datasets differ by one privacy
unit added or removed) or ``replace-one`` (one unit replaced by another; for the same noise ε is
larger). ``accounted_adjacency`` says which relation the accountant applied to the mechanism's own
units when that differs: per-subset DPAgg-TI releases one embedding per subset, so adding an image
*replaces* one subset's embedding, and ε is accounted as replace-one over subsets.

Writes go to a temporary file in the target's folder and are moved into place with ``os.replace``,
so a crash never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from ..errors import public_name

__all__ = [
    "ADJACENCIES",
    "DP_MECHANISMS",
    "MECHANISMS",
    "METADATA_KEY",
    "PRIVACY_UNITS",
    "PrivacyRecord",
    "PrivacyRecordError",
    "SIDECAR_SUFFIX",
    "read_record",
    "record_for_dp_fedavg",
    "record_for_dp_sgd",
    "record_for_gaussian_aggregate",
    "record_for_split",
    "sidecar_path",
    "write_safetensors",
    "write_sidecar",
]

METADATA_KEY = "privdiff_privacy"
SIDECAR_SUFFIX = ".privacy.json"
DP_MECHANISMS = ("dp-sgd", "gaussian-aggregate", "dp-fedavg")
SPLIT_MECHANISMS = ("split-hardened", "split-paper")
MECHANISMS = DP_MECHANISMS + SPLIT_MECHANISMS + ("none",)
PRIVACY_UNITS = ("example", "subject", "client")
ADJACENCIES = ("add-remove", "replace-one")

_FORMAT = "privdiff-privacy"
_FORMAT_VERSION = 2  # 2 added adjacency; every version-1 record was computed under add-remove
# Fields that only mean something under a DP guarantee; split-* and none must leave them empty.
_DP_ONLY = ("epsilon", "delta", "noise_multiplier", "clip", "sample_rate", "accountant", "adjacency",
            "accounted_adjacency")

_SPLIT_NOT_COVERED = (
    "Split learning gives no differential-privacy guarantee: there is no epsilon. What the server can "
    "reconstruct is measured by the attacks recorded under 'attack'."
)


@public_name
class PrivacyRecordError(ValueError):
    """A privacy record is invalid, malformed, or missing from a file."""


def _version() -> str:
    from .. import __version__

    return __version__


def _is_real(value) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__")


@dataclass(frozen=True)
class PrivacyRecord:
    """What a released artifact guarantees, and under which settings (validated on construction).

    ``clip`` is the per-example (or per-client) L2 bound C; the JSON of a ``dp-sgd`` record also lists it
    as ``max_grad_norm``, opacus' name. ``extra`` holds JSON values only: split-learning noise settings,
    measured attack figures, a heterogeneous accountant ``history``, and ``not_covered``, a note on what
    the guarantee leaves out.
    """

    mechanism: str
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    clip: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    num_examples: int | None = None
    privacy_unit: str | None = "example"
    accountant: str | None = None
    adjacency: str | None = None  # required for DP mechanisms: "add-remove" or "replace-one"
    accounted_adjacency: str | None = None  # the relation over the mechanism's own units, when it differs
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    privdiff_version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise PrivacyRecordError(
                f"invalid privacy record for mechanism={self.mechanism!r}:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        # Normalise numbers (numpy scalars, ints for floats) and take a private copy of extra, so the
        # frozen record cannot change through a dict the caller still holds.
        set_ = object.__setattr__
        for name in ("epsilon", "delta", "noise_multiplier", "clip", "sample_rate"):
            if getattr(self, name) is not None:
                set_(self, name, float(getattr(self, name)))
        for name in ("steps", "num_examples"):
            if getattr(self, name) is not None:
                set_(self, name, int(getattr(self, name)))
        set_(self, "extra", json.loads(json.dumps(dict(self.extra))))

    def _problems(self) -> list[str]:
        m = self.mechanism
        if m not in MECHANISMS:
            return [f"mechanism={m!r} is not known; use one of {', '.join(map(repr, MECHANISMS))}"]
        problems: list[str] = []
        if m in DP_MECHANISMS:
            if not (_is_real(self.epsilon) and math.isfinite(self.epsilon) and self.epsilon > 0):
                problems.append(
                    f"epsilon={self.epsilon!r} must be a finite number > 0 (an infinite epsilon is no guarantee: "
                    "use mechanism='none')"
                )
            if not (_is_real(self.delta) and 0 < self.delta < 1):
                problems.append(f"delta={self.delta!r} must be in (0, 1), e.g. 1e-5")
            if not (_is_real(self.noise_multiplier) and math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
                problems.append(f"noise_multiplier={self.noise_multiplier!r} must be a finite number > 0")
            if not (_is_real(self.clip) and math.isfinite(self.clip) and self.clip > 0):
                problems.append(f"clip={self.clip!r} must be a finite number > 0 (the L2 clipping bound C)")
            if not (_is_real(self.sample_rate) and 0 < self.sample_rate <= 1):
                problems.append(f"sample_rate={self.sample_rate!r} must be in (0, 1] (1 for no subsampling)")
            if not (_is_int(self.steps) and self.steps >= 1):
                problems.append(f"steps={self.steps!r} must be an integer >= 1 (the number of compositions)")
            elif m == "gaussian-aggregate" and self.steps != 1:
                problems.append(f"steps={self.steps!r} must be 1 for gaussian-aggregate (one noisy release)")
            if not (_is_int(self.num_examples) and self.num_examples >= 1):
                problems.append(f"num_examples={self.num_examples!r} must be an integer >= 1 (the number of privacy units)")
            if not (isinstance(self.accountant, str) and self.accountant):
                problems.append(f"accountant={self.accountant!r} must name the accountant that computed epsilon, e.g. 'prv'")
            if self.privacy_unit not in PRIVACY_UNITS:
                problems.append(f"privacy_unit={self.privacy_unit!r} must be one of {', '.join(map(repr, PRIVACY_UNITS))}")
            if self.adjacency not in ADJACENCIES:
                problems.append(f"adjacency={self.adjacency!r} must be one of {', '.join(map(repr, ADJACENCIES))}: "
                                "which neighbouring datasets the guarantee is stated for")
            if self.accounted_adjacency is not None and self.accounted_adjacency not in ADJACENCIES:
                problems.append(f"accounted_adjacency={self.accounted_adjacency!r} must be None or one of "
                                f"{', '.join(map(repr, ADJACENCIES))}")
        else:
            for name in _DP_ONLY:
                if getattr(self, name) is not None:
                    why = "it has no epsilon: put its settings in extra" if m in SPLIT_MECHANISMS else "public artifacts carry no DP fields"
                    problems.append(f"{name}={getattr(self, name)!r} must be None for mechanism={m!r} ({why})")
            if self.privacy_unit is not None and self.privacy_unit not in PRIVACY_UNITS:
                problems.append(f"privacy_unit={self.privacy_unit!r} must be None or one of {', '.join(map(repr, PRIVACY_UNITS))}")
            for name in ("steps", "num_examples"):
                value = getattr(self, name)
                if value is not None and not (_is_int(value) and value >= 0):
                    problems.append(f"{name}={value!r} must be None or an integer >= 0")
        if not isinstance(self.extra, Mapping):
            problems.append(f"extra={self.extra!r} must be a dict of JSON values")
        else:
            bad_keys = [k for k in self.extra if not isinstance(k, str)]
            if bad_keys:
                problems.append(f"extra keys {bad_keys!r} must be strings")
            else:
                try:
                    json.dumps(dict(self.extra), allow_nan=False)
                except (TypeError, ValueError) as exc:
                    problems.append(f"extra must hold JSON values only (str, finite numbers, bool, None, lists, dicts): {exc}")
        if not isinstance(self.privdiff_version, str):
            problems.append(f"privdiff_version={self.privdiff_version!r} must be a string")
        return problems

    @property
    def covered_by_dp(self) -> bool:
        """True when the record states an (ε, δ) guarantee."""
        return self.mechanism in DP_MECHANISMS

    # ----------------------------------------------------------------------------------- JSON

    def summary_lines(self) -> list[str]:
        """The record for people: the guarantee first, then the settings it rests on."""
        if self.mechanism == "none":
            lines = ["NO differential privacy: this artifact is public or was trained without DP."]
        elif self.epsilon is not None:
            unit = {"example": "each training example", "subject": "each person (all their examples)",
                    "client": "each client (all its data)"}.get(self.privacy_unit or "example", self.privacy_unit)
            relation = ("one of them added or removed" if self.adjacency == "add-remove"
                        else "one of them replaced by another")
            lines = [f"(ε = {self.epsilon:.4g}, δ = {self.delta:.3g})-differential privacy for {unit}",
                     f"adjacency: {self.adjacency} (neighbouring datasets differ by {relation})",
                     f"mechanism: {self.mechanism}"]
            if self.accounted_adjacency is not None:
                lines.append(f"accounted as: {self.accounted_adjacency} over the mechanism's own units")
        else:
            lines = [f"mechanism: {self.mechanism} (no ε: see the measured figures below)"]
        for label, value in (("noise multiplier σ/C", self.noise_multiplier), ("clip C", self.clip),
                             ("sample rate q", self.sample_rate), ("steps", self.steps),
                             ("examples", self.num_examples), ("accountant", self.accountant)):
            if value is not None:
                lines.append(f"{label}: {value:.4g}" if isinstance(value, float) else f"{label}: {value}")
        for key, value in self.extra.items():
            lines.append(f"{key}: {json.dumps(value)}")
        lines.append(f"privdiff {self.privdiff_version}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": _FORMAT, "format_version": _FORMAT_VERSION}
        for f in dataclasses.fields(self):
            data[f.name] = copy.deepcopy(getattr(self, f.name))
        if self.mechanism == "dp-sgd":
            data["max_grad_norm"] = self.clip  # opacus' name for C, for readers that know DP-SGD
        return data

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyRecord":
        if not isinstance(data, Mapping):
            raise PrivacyRecordError(f"a privacy record must be a JSON object, not {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", None)
        version = data.pop("format_version", None)
        if fmt != _FORMAT:
            raise PrivacyRecordError(f"format={fmt!r} is not a privdiff privacy record (expected {_FORMAT!r})")
        if not _is_int(version) or not 1 <= version <= _FORMAT_VERSION:
            raise PrivacyRecordError(
                f"format_version={version!r} is not supported (this privdiff reads up to {_FORMAT_VERSION}); upgrade privdiff"
            )
        if version == 1 and data.get("mechanism") in DP_MECHANISMS:
            data.setdefault("adjacency", "add-remove")  # privdiff 0.1 accounted every record so
        if "max_grad_norm" in data:
            alias = data.pop("max_grad_norm")
            if data.get("clip") is None:
                data["clip"] = alias
            elif alias != data["clip"]:
                raise PrivacyRecordError(f"max_grad_norm={alias!r} and clip={data['clip']!r} disagree; they name the same C")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            # Refuse rather than drop: an unknown field may qualify the guarantee.
            raise PrivacyRecordError(f"unknown privacy record fields {unknown!r}; upgrade privdiff to read this record")
        if "mechanism" not in data:
            raise PrivacyRecordError("the privacy record has no 'mechanism' field")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> "PrivacyRecord":
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PrivacyRecordError(f"the privacy record is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------ builders


def record_for_dp_sgd(
    *,
    history: Sequence,
    clip: float,
    num_examples: int,
    delta: float,
    accountant: str = "prv",
    privacy_unit: str = "example",
    mechanism: str = "dp-sgd",
    adjacency: str = "add-remove",
    extra: Mapping[str, Any] | None = None,
) -> PrivacyRecord:
    """The record of a DP-SGD run whose steps are ``history`` (segments or an ``Accountant``).

    ε is computed here with ``accountant`` under ``adjacency`` (an ``Accountant`` brings its own). A
    heterogeneous history (a resumed run that changed its settings) is listed in full under
    ``extra['history']``; the scalar fields then give the last segment's σ and q and the total number
    of steps.
    """
    from .accounting import Accountant, _as_history, history_epsilon

    if isinstance(history, Accountant):
        adjacency = history.adjacency
    if adjacency == "replace-one":
        accountant = "pld"  # the one accountant here with the replace-one relation
    segments = _as_history(history)
    if not segments:
        raise PrivacyRecordError("history is empty: a DP record needs at least one noisy step")
    eps = history_epsilon(history=segments, delta=delta, accountant=accountant, adjacency=adjacency)
    extra = dict(extra or {})
    if len({s[:2] for s in segments}) > 1:
        extra["history"] = [list(s) for s in segments]
    last = segments[-1]
    return PrivacyRecord(
        mechanism=mechanism,
        epsilon=eps,
        delta=delta,
        noise_multiplier=last.noise_multiplier,
        clip=clip,
        sample_rate=last.sample_rate,
        steps=sum(s.steps for s in segments),
        num_examples=num_examples,
        privacy_unit=privacy_unit,
        accountant=accountant,
        adjacency=adjacency,
        extra=extra,
    )


def record_for_dp_fedavg(
    *,
    history: Sequence,
    clip: float,
    num_clients: int,
    delta: float,
    accountant: str = "prv",
    adjacency: str = "add-remove",
    extra: Mapping[str, Any] | None = None,
) -> PrivacyRecord:
    """Client-level DP FedAvg: each segment is (σ, clients sampled per round / clients, rounds)."""
    return record_for_dp_sgd(
        history=history, clip=clip, num_examples=num_clients, delta=delta, accountant=accountant,
        privacy_unit="client", mechanism="dp-fedavg", adjacency=adjacency, extra=extra,
    )


def record_for_gaussian_aggregate(
    *,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    num_examples: int,
    delta: float,
    accountant: str = "pld",
    privacy_unit: str = "example",
    adjacency: str = "add-remove",
    accounted_adjacency: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> PrivacyRecord:
    """DPAgg-TI's one noisy average. Without subsampling the accountant is the exact analytic Gaussian.
    `accounted_adjacency`: the relation over the released units when it is not `adjacency` itself
    (per-subset units: adding one image replaces one subset's embedding)."""
    from .accounting import gaussian_aggregate_epsilon

    eps = gaussian_aggregate_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta,
                                     accountant=accountant, adjacency=accounted_adjacency or adjacency)
    return PrivacyRecord(
        mechanism="gaussian-aggregate",
        epsilon=eps,
        delta=delta,
        noise_multiplier=noise_multiplier,
        clip=clip,
        sample_rate=sample_rate,
        steps=1,
        num_examples=num_examples,
        privacy_unit=privacy_unit,
        accountant="analytic-gaussian" if sample_rate == 1 else "pld",
        adjacency=adjacency,
        accounted_adjacency=accounted_adjacency if accounted_adjacency != adjacency else None,
        extra=dict(extra or {}),
    )


def record_for_split(
    *,
    mode: str,
    settings: Mapping[str, Any],
    attack: Mapping[str, Any] | None = None,
    steps: int | None = None,
    num_examples: int | None = None,
    privacy_unit: str = "example",
    extra: Mapping[str, Any] | None = None,
) -> PrivacyRecord:
    """A split-learning ControlNet's record: its noise ``settings`` and measured ``attack`` figures, no ε."""
    if mode not in ("hardened", "paper"):
        raise PrivacyRecordError(f"mode={mode!r} must be 'hardened' or 'paper'")
    merged = dict(extra or {})
    merged.update(settings=dict(settings), attack=dict(attack) if attack is not None else None)
    merged.setdefault("not_covered", _SPLIT_NOT_COVERED)
    return PrivacyRecord(
        mechanism=f"split-{mode}", steps=steps, num_examples=num_examples, privacy_unit=privacy_unit, extra=merged
    )


# -------------------------------------------------------------------------------------- files


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the record of a file without metadata lives: ``<file>.privacy.json``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _default_mode() -> int:
    # mkstemp makes 0600 files; released artifacts should get the usual umask-based mode instead.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


@contextlib.contextmanager
def atomic_target(path: Path):
    """Yield a temporary path beside ``path``; on success fsync it, move it onto ``path`` and fsync
    the folder, so that after a crash ``path`` holds the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = _default_mode()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = _os_error_inside(error)
        if failed is not None:  # safetensors reports a full disk as its own error type
            raise failed from error
        raise


def _os_error_inside(error: BaseException) -> OSError | None:
    """An OSError for a library error that wraps one ("... (os error 28)"), so callers catch one type."""
    import re

    if isinstance(error, OSError):
        return None
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number))


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_record(record) -> PrivacyRecord:
    if not isinstance(record, PrivacyRecord):
        raise PrivacyRecordError(f"record must be a PrivacyRecord, not {type(record).__name__}; build one with PrivacyRecord(...)")
    return record


def write_safetensors(
    *,
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    record: PrivacyRecord,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (name -> torch tensor) as safetensors with ``record`` in its metadata, atomically."""
    from safetensors.torch import save_file

    record = _check_record(record)
    path = Path(path)
    md = dict(metadata or {})
    bad = {k: v for k, v in md.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"metadata values must be strings (safetensors stores only strings); convert {bad!r}, e.g. with json.dumps")
    if METADATA_KEY in md:
        raise ValueError(f"metadata must not contain {METADATA_KEY!r}: pass the record as record= instead")
    md[METADATA_KEY] = record.to_json()
    # safetensors refuses non-contiguous tensors; a contiguous CPU copy stores the same values.
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_sidecar(*, path: str | os.PathLike, record: PrivacyRecord) -> Path:
    """Write ``record`` to ``<path>.privacy.json`` (atomically) and return the sidecar's path."""
    record = _check_record(record)
    target = sidecar_path(path)
    _write_text_atomic(target, record.to_json(indent=2) + "\n")
    return target


BYPRODUCT_SUFFIX = ".not-covered-by-dp.json"


def write_byproduct_report(*, folder: str | os.PathLike, name: str, data: Mapping[str, Any], why: str) -> Path:
    """An audit's or a run's figures measured on private data, as `<name>.not-covered-by-dp.json`:
    labelled in its name and in its content (`not_covered_by_dp`: why), written atomically."""
    path = Path(folder) / f"{name}{BYPRODUCT_SUFFIX}"
    _write_text_atomic(path, json.dumps({"not_covered_by_dp": why, **data}, indent=1, default=str) + "\n")
    return path


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise PrivacyRecordError(f"{path} is not a readable safetensors file ({exc})") from None


def read_record(path: str | os.PathLike) -> PrivacyRecord:
    """The privacy record of an artifact: safetensors metadata first, else the ``.privacy.json`` sidecar.

    Raises ``FileNotFoundError`` when the artifact does not exist and ``PrivacyRecordError`` when it has
    no record or a malformed one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        text = _safetensors_metadata(path).get(METADATA_KEY)
        if text is not None:
            try:
                return PrivacyRecord.from_json(text)
            except PrivacyRecordError as exc:
                raise PrivacyRecordError(f"{path}: {exc}") from None
    side = sidecar_path(path)
    if side.exists():
        try:
            return PrivacyRecord.from_json(side.read_text(encoding="utf-8"))
        except PrivacyRecordError as exc:
            raise PrivacyRecordError(f"{side}: {exc}") from None
    where = f"metadata key {METADATA_KEY!r} or " if path.suffix == ".safetensors" else ""
    raise PrivacyRecordError(
        f"{path} carries no privacy record (no {where}sidecar {side.name}); treat it as unaudited, or write one "
        "with write_safetensors/write_sidecar"
    )
