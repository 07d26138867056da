"""The privdiff command and the package's import cost."""

import subprocess
import sys

from PIL import Image

from privdiff.cli import main


def test_import_privdiff_does_not_import_torch():
    code = (
        "import sys, time; t = time.perf_counter(); import privdiff, privdiff.cli; "
        "print(time.perf_counter() - t, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, torch_loaded, diffusers_loaded = float(out[0]), out[1], out[2]
    assert torch_loaded == "False" and diffusers_loaded == "False"
    assert seconds < 0.2, f"import privdiff took {seconds:.3f} s"


def test_demo_data_feature_writes_grids_without_metadata(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--only", "data"]) == 0
    for name in ("circles", "shapes"):
        image = Image.open(tmp_path / "data" / f"{name}.png")
        assert image.size[0] > 200
        assert not image.info, "privdiff PNGs carry no text chunks (prompts, paths) unless asked"
    assert "circles: 8 procedural items" in capsys.readouterr().out


def test_demo_generate_writes_the_sample_grid(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--only", "generate", "--seed", "3"]) == 0
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size[0] >= 4 * 96


def test_unknown_demo_feature_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a demo feature" in err and "generate" in err


def test_bad_base_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--only", "generate", "--base", str(tmp_path / "missing")]) == 2
    assert "nothing exists" in capsys.readouterr().err


def test_inspect_reports_layout(tmp_path, tiny_sd1, capsys):
    from privdiff.models.original_layout import save_single_file

    path = save_single_file(pipeline=tiny_sd1, path=tmp_path / "m.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SD 1.x-layout" in out and "model_channels=32" in out and "bundled config: none" in out


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "privdiff", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("privdiff ")


def test_demo_split_trains_two_clients_on_loopback_and_attacks_the_recorded_traffic(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--only", "split"]) == 0
    out = capsys.readouterr().out
    assert "2 clients, 12 server steps" in out and "mean-image guess" in out
    from privdiff.pipelines.split_run import load_split_controlnet_file
    from privdiff.privacy.record import read_record

    path = tmp_path / "split" / "split_controlnet.safetensors"
    assert load_split_controlnet_file(path).controlnet.config["privdiff_split_controlnet"]["version"] == 1
    assert read_record(path).mechanism == "split-hardened"
    # Only the release: the recorded traffic stayed in memory, the keys and secrets in a scratch folder.
    assert sorted(p.name for p in (tmp_path / "split").rglob("*")) == ["split_controlnet.safetensors"]


def test_an_sdxl_single_file_with_its_tokenizers_trains_dp_ti_from_the_cli(tmp_path, capsys):
    """--config, --tokenizer and --tokenizer-2 reach the model the command trains (and are needed)."""
    import shutil

    from safetensors.torch import load_file

    from privdiff.models.original_layout import save_single_file
    from privdiff.models.tiny import TinySpec, tiny_pipeline

    sdxl = tiny_pipeline(spec=TinySpec(family="sdxl"), seed=0)
    path = save_single_file(pipeline=sdxl, path=tmp_path / "sdxl.safetensors")
    sdxl.save_pretrained(tmp_path / "architecture")  # a non-standard size: its config folder, without tokenizers
    for slot in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(tmp_path / "architecture" / slot)
        getattr(sdxl, slot).save_pretrained(tmp_path / slot)
    argv = ["train", "dp-ti", "--method", "dpagg", "--base", str(path), "--config", str(tmp_path / "architecture"),
            "--data", "style", "--num-items", "4", "--steps", "1", "--batch-size", "2", "--token", "<sx>",
            "--init-word", "circle"]
    assert main([*argv, "--out", str(tmp_path / "without")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(tmp_path / "tokenizer"), "--tokenizer-2", str(tmp_path / "tokenizer_2"),
                 "--out", str(tmp_path / "ti")]) == 0
    embedding = load_file(str(tmp_path / "ti" / "learned_embeds.safetensors"))
    assert sorted(embedding) == ["clip_g", "clip_l"]
