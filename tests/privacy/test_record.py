"""The privacy record: validation per mechanism, JSON, safetensors metadata, sidecars, atomic writes."""

import json
import math
import os

import pytest
import torch

from privdiff import __version__
from privdiff.privacy.accounting import Accountant, analytic_gaussian_epsilon
from privdiff.privacy.record import (
    METADATA_KEY,
    PrivacyRecord,
    PrivacyRecordError,
    read_record,
    record_for_dp_fedavg,
    record_for_dp_sgd,
    record_for_gaussian_aggregate,
    record_for_split,
    sidecar_path,
    write_safetensors,
    write_sidecar,
)

DP_SGD = dict(
    mechanism="dp-sgd", epsilon=9.7, delta=1e-5, noise_multiplier=0.8, clip=1e-3, sample_rate=0.04,
    steps=1250, num_examples=50000, privacy_unit="example", accountant="prv", adjacency="add-remove",
)


def dp_sgd(**changes):
    return PrivacyRecord(**{**DP_SGD, **changes})


def test_valid_records_and_defaults():
    r = dp_sgd()
    assert r.covered_by_dp and r.privdiff_version == __version__ and r.extra == {}
    assert not PrivacyRecord(mechanism="none").covered_by_dp
    split = PrivacyRecord(mechanism="split-hardened", steps=12500, num_examples=100, extra={"label_noise": 0.5})
    assert split.epsilon is None and split.extra["label_noise"] == 0.5


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(mechanism="dp-magic"), r"mechanism='dp-magic' is not known; use one of 'dp-sgd'"),
        (dict(epsilon=math.inf), r"epsilon=inf must be a finite number > 0 .*use mechanism='none'"),
        (dict(epsilon=0.0), r"epsilon=0\.0 must be a finite number > 0"),
        (dict(epsilon=None), r"epsilon=None"),
        (dict(delta=1.0), r"delta=1\.0 must be in \(0, 1\)"),
        (dict(noise_multiplier=0.0), r"noise_multiplier=0\.0 must be a finite number > 0"),
        (dict(clip=-1.0), r"clip=-1\.0 must be a finite number > 0 \(the L2 clipping bound C\)"),
        (dict(sample_rate=0.0), r"sample_rate=0\.0 must be in \(0, 1\]"),
        (dict(steps=0), r"steps=0 must be an integer >= 1"),
        (dict(steps=10.5), r"steps=10\.5 must be an integer"),
        (dict(num_examples=None), r"num_examples=None must be an integer >= 1"),
        (dict(accountant=""), r"accountant='' must name the accountant"),
        (dict(privacy_unit="pixel"), r"privacy_unit='pixel' must be one of 'example', 'subject', 'client'"),
        (dict(extra={"psnr": float("nan")}), r"extra must hold JSON values only"),
        (dict(extra={"tensor": object()}), r"extra must hold JSON values only"),
        (dict(mechanism="gaussian-aggregate", steps=3), r"steps=3 must be 1 for gaussian-aggregate"),
        (dict(adjacency=None), r"adjacency=None must be one of 'add-remove', 'replace-one'"),
        (dict(adjacency="swap"), r"adjacency='swap' must be one of"),
        (dict(accounted_adjacency="swap"), r"accounted_adjacency='swap' must be None or one of"),
    ],
)
def test_dp_record_validation(changes, match):
    with pytest.raises(PrivacyRecordError, match=match):
        dp_sgd(**changes)


def test_validation_lists_every_problem():
    with pytest.raises(PrivacyRecordError) as info:
        dp_sgd(epsilon=-1.0, delta=2.0, clip=None)
    text = str(info.value)
    assert "epsilon=-1.0" in text and "delta=2.0" in text and "clip=None" in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("mechanism", ["none", "split-hardened", "split-paper"])
def test_non_dp_records_carry_no_epsilon(mechanism):
    with pytest.raises(PrivacyRecordError, match=rf"epsilon=1\.0 must be None for mechanism='{mechanism}'"):
        PrivacyRecord(mechanism=mechanism, epsilon=1.0)
    with pytest.raises(PrivacyRecordError, match=r"noise_multiplier=0\.5 must be None"):
        PrivacyRecord(mechanism=mechanism, noise_multiplier=0.5)


def test_record_is_frozen_and_owns_its_extra():
    extra = {"not_covered": "loss curves"}
    r = dp_sgd(extra=extra)
    extra["not_covered"] = "changed"
    assert r.extra["not_covered"] == "loss curves"
    with pytest.raises(AttributeError):
        r.epsilon = 1.0  # type: ignore[misc]


def test_json_round_trip_and_max_grad_norm_alias():
    r = dp_sgd(extra={"not_covered": "resume checkpoints", "history": [[0.8, 0.04, 1250]]})
    data = json.loads(r.to_json())
    assert data["max_grad_norm"] == data["clip"] == 1e-3
    assert data["mechanism"] == "dp-sgd" and data["privdiff_version"] == __version__
    assert PrivacyRecord.from_json(r.to_json()) == r
    # A writer that uses only opacus' name is read as well.
    del data["clip"]
    assert PrivacyRecord.from_dict(data) == r
    # Other mechanisms do not get the DP-SGD alias.
    agg = dp_sgd(mechanism="gaussian-aggregate", steps=1, accountant="pld")
    assert "max_grad_norm" not in json.loads(agg.to_json())
    assert PrivacyRecord.from_json(agg.to_json()) == agg
    none = PrivacyRecord(mechanism="none")
    assert PrivacyRecord.from_json(none.to_json()) == none


def test_from_json_rejects_malformed():
    good = json.loads(dp_sgd().to_json())
    with pytest.raises(PrivacyRecordError, match="not valid JSON"):
        PrivacyRecord.from_json("{")
    with pytest.raises(PrivacyRecordError, match="is not a privdiff privacy record"):
        PrivacyRecord.from_json(json.dumps({**good, "format": "x"}))
    with pytest.raises(PrivacyRecordError, match="format_version=3 is not supported.*upgrade privdiff"):
        PrivacyRecord.from_json(json.dumps({**good, "format_version": 3}))
    with pytest.raises(PrivacyRecordError, match=r"unknown privacy record fields \['surprise'\]"):
        PrivacyRecord.from_json(json.dumps({**good, "surprise": 1}))
    with pytest.raises(PrivacyRecordError, match="max_grad_norm=0.5 and clip=0.001 disagree"):
        PrivacyRecord.from_json(json.dumps({**good, "max_grad_norm": 0.5}))
    with pytest.raises(PrivacyRecordError, match=r"epsilon=-2"):
        PrivacyRecord.from_json(json.dumps({**good, "epsilon": -2}))


def test_builders():
    acc = Accountant(accountant="rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    r = record_for_dp_sgd(history=acc, clip=1.0, num_examples=1000, delta=1e-4, accountant="rdp")
    assert r.epsilon == acc.epsilon(delta=1e-4) and r.steps == 100 and "history" not in r.extra
    acc.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=50)
    r2 = record_for_dp_sgd(history=acc, clip=1.0, num_examples=1000, delta=1e-4, accountant="rdp")
    assert r2.steps == 150 and r2.noise_multiplier == 2.0 and r2.extra["history"] == [[1.0, 0.01, 100], [2.0, 0.02, 50]]
    assert r2.epsilon > r.epsilon

    fed = record_for_dp_fedavg(history=[(1.0, 0.1, 30)], clip=0.5, num_clients=50, delta=1e-3, accountant="rdp")
    assert fed.mechanism == "dp-fedavg" and fed.privacy_unit == "client" and fed.num_examples == 50

    agg = record_for_gaussian_aggregate(noise_multiplier=2.0, clip=1.0, sample_rate=1.0, num_examples=100, delta=1e-4)
    assert agg.accountant == "analytic-gaussian" and agg.steps == 1
    assert agg.epsilon == analytic_gaussian_epsilon(noise_multiplier=2.0, delta=1e-4)

    split = record_for_split(mode="hardened", settings={"label_noise": 0.5}, attack={"image_psnr": 11.2}, steps=10)
    assert split.mechanism == "split-hardened" and split.epsilon is None
    assert split.extra["attack"]["image_psnr"] == 11.2 and "no differential-privacy guarantee" in split.extra["not_covered"]
    with pytest.raises(PrivacyRecordError, match="mode='secure' must be 'hardened' or 'paper'"):
        record_for_split(mode="secure", settings={})
    with pytest.raises(PrivacyRecordError, match="history is empty"):
        record_for_dp_sgd(history=[], clip=1.0, num_examples=10, delta=1e-3)


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")] == []


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"clip_l": torch.randn(2, 768, generator=g), "step": torch.tensor([3], dtype=torch.int64),
               "strided": torch.randn(4, 6, generator=g).t()}  # non-contiguous on purpose
    record = dp_sgd(extra={"not_covered": "previews"})
    path = write_safetensors(path=tmp_path / "emb.safetensors", tensors=tensors, record=record, metadata={"token": "<p>"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name]) and loaded[name].dtype == tensors[name].dtype
    assert read_record(path) == record
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["token"] == "<p>" and json.loads(md[METADATA_KEY])["epsilon"] == 9.7
    assert _no_temp_files(tmp_path)
    # Overwriting replaces the record as a whole.
    write_safetensors(path=path, tensors=tensors, record=PrivacyRecord(mechanism="none"))
    assert read_record(path).mechanism == "none"
    assert _no_temp_files(tmp_path)


def test_safetensors_rejects_bad_metadata(tmp_path):
    t = {"x": torch.zeros(1)}
    with pytest.raises(ValueError, match="metadata values must be strings.*json.dumps"):
        write_safetensors(path=tmp_path / "a.safetensors", tensors=t, record=dp_sgd(), metadata={"steps": 3})
    with pytest.raises(ValueError, match="must not contain 'privdiff_privacy'"):
        write_safetensors(path=tmp_path / "a.safetensors", tensors=t, record=dp_sgd(), metadata={METADATA_KEY: "{}"})
    with pytest.raises(PrivacyRecordError, match="record must be a PrivacyRecord, not dict"):
        write_safetensors(path=tmp_path / "a.safetensors", tensors=t, record={"mechanism": "none"})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    # A tensor safetensors cannot store fails mid-write: neither the artifact nor a temp file remains,
    # and an existing artifact is left untouched.
    path = tmp_path / "m.safetensors"
    write_safetensors(path=path, tensors={"x": torch.ones(2)}, record=dp_sgd())
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(Exception):
        write_safetensors(path=path, tensors={"a": shared, "b": shared}, record=PrivacyRecord(mechanism="none"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_sidecar_for_pt_embedding(tmp_path):
    pt = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 768)}, "name": "style"}, pt)
    record = record_for_gaussian_aggregate(noise_multiplier=3.0, clip=1.0, sample_rate=0.5, num_examples=20, delta=1e-3)
    side = write_sidecar(path=pt, record=record)
    assert side == sidecar_path(pt) == tmp_path / "style.pt.privacy.json"
    assert json.loads(side.read_text())["mechanism"] == "gaussian-aggregate"
    assert read_record(pt) == record
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(side).st_mode & 0o777 == 0o666 & ~umask  # the usual mode for new files, not mkstemp's 0600
    assert _no_temp_files(tmp_path)
    # The .pt itself is untouched and still loads.
    assert torch.equal(torch.load(pt, weights_only=True)["string_to_param"]["*"], torch.ones(1, 768))


def test_read_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_record(tmp_path / "missing.pt")
    png = tmp_path / "preview.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(PrivacyRecordError, match=r"carries no privacy record \(no sidecar preview.png.privacy.json\)"):
        read_record(png)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(PrivacyRecordError, match="no metadata key 'privdiff_privacy' or sidecar"):
        read_record(bare)
    sidecar_path(png).write_text('{"format": "privdiff-privacy", "format_version": 1, "mechanism": "dp-sgd"}')
    with pytest.raises(PrivacyRecordError, match=r"preview.png.privacy.json: invalid privacy record"):
        read_record(png)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PrivacyRecordError, match="not a readable safetensors file"):
        read_record(junk)


def test_summary_lines_state_the_guarantee_first():
    from privdiff.privacy.record import PrivacyRecord

    record = PrivacyRecord(mechanism="gaussian-aggregate", epsilon=1.0, delta=1e-5, noise_multiplier=3.2, clip=0.5,
                           sample_rate=1.0, steps=1, num_examples=100, accountant="analytic", adjacency="replace-one")
    lines = record.summary_lines()
    assert lines[0] == "(ε = 1, δ = 1e-05)-differential privacy for each training example"
    assert lines[1] == "adjacency: replace-one (neighbouring datasets differ by one of them replaced by another)"
    assert "clip C: 0.5" in lines and "examples: 100" in lines
    assert PrivacyRecord(mechanism="none").summary_lines()[0].startswith("NO differential privacy")


def test_version_1_records_read_as_add_remove_and_new_ones_state_their_adjacency():
    old = json.loads(dp_sgd().to_json())
    old["format_version"] = 1
    del old["adjacency"], old["accounted_adjacency"]
    assert PrivacyRecord.from_dict(old).adjacency == "add-remove"  # privdiff 0.1 accounted every record so
    assert json.loads(dp_sgd().to_json())["format_version"] == 2
    with pytest.raises(PrivacyRecordError, match="adjacency='add-remove' must be None for mechanism='none'"):
        PrivacyRecord(mechanism="none", adjacency="add-remove")


def test_replace_one_records_carry_the_larger_epsilon_of_dp_accounting_pld():
    import dp_accounting
    from dp_accounting import pld

    acc = Accountant(accountant="pld", adjacency="replace-one")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    replace = record_for_dp_sgd(history=acc, clip=1.0, num_examples=10_000, delta=1e-5)
    add = record_for_dp_sgd(history=[(1.0, 0.01, 500)], clip=1.0, num_examples=10_000, delta=1e-5, accountant="pld")
    assert (replace.adjacency, replace.accountant, add.adjacency) == ("replace-one", "pld", "add-remove")
    independent = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                                    value_discretization_interval=1e-4)
    independent.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 500))
    assert replace.epsilon == pytest.approx(independent.get_epsilon(1e-5), rel=0.02)
    assert replace.epsilon > 1.3 * add.epsilon
    # Without subsampling, replace-one is the Gaussian mechanism at twice the sensitivity (exact).
    agg = record_for_gaussian_aggregate(noise_multiplier=4.0, clip=0.5, sample_rate=1.0, num_examples=100,
                                        delta=1e-5, adjacency="replace-one")
    assert agg.epsilon == pytest.approx(analytic_gaussian_epsilon(noise_multiplier=2.0, delta=1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="replace-one.*PLD"):
        Accountant(accountant="prv", adjacency="replace-one")
