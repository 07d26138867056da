import pytest
import torch

from privdiff.pipelines.release import check_release_name, publish_release
from privdiff.privacy.record import PrivacyRecord, read_record, write_safetensors, write_sidecar


def _record():
    return PrivacyRecord(mechanism="none")


def test_publish_copies_the_file_with_its_record(tmp_path):
    source = write_safetensors(path=tmp_path / "run" / "w.safetensors", tensors={"x": torch.ones(2)}, record=_record())
    target = publish_release(source=source, destination=tmp_path / "loras" / "mine.safetensors")
    assert read_record(target).mechanism == "none"
    assert publish_release(source=source, destination=target) == target  # the same file again: fine


def test_publish_never_overwrites_another_file_unless_asked(tmp_path):
    source = write_safetensors(path=tmp_path / "a.safetensors", tensors={"x": torch.ones(2)}, record=_record())
    other = write_safetensors(path=tmp_path / "loras" / "mine.safetensors", tensors={"x": torch.zeros(2)}, record=_record())
    with pytest.raises(FileExistsError, match="choose another name"):
        publish_release(source=source, destination=other)
    publish_release(source=source, destination=other, replace=True)
    assert other.read_bytes() == source.read_bytes()


def test_publish_carries_a_sidecar(tmp_path):
    source = tmp_path / "e.pt"
    torch.save({"x": torch.ones(1)}, source)
    write_sidecar(path=source, record=_record())
    target = publish_release(source=source, destination=tmp_path / "out" / "e.pt")
    assert read_record(target).mechanism == "none"


@pytest.mark.parametrize("name", ["../up", "a b", "", ".hidden", "x" * 101, "dot."])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="letters, digits"):
        check_release_name(name)
