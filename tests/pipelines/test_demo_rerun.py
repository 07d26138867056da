"""`privdiff demo` can be run again into the same folder (CI and users do)."""

from privdiff.pipelines.demo import run_demo


def test_the_demo_runs_twice_into_the_same_folder(tmp_path):
    for _ in range(2):
        result = run_demo(out=tmp_path, only="dp-ldm", progress=lambda line: None)
        assert (tmp_path / "dp-ldm" / "dp_ldm_comfyui.safetensors").is_file() and "dp-ldm" in result.summaries
