"""README.md's snippets work: every Python block runs as written, every `privdiff` command line parses.

The Python blocks run in a scratch folder holding what they name (a single file saved from
privdiff-tiny under the name the README uses, and its tokenizer folder). The shell blocks' commands are
parsed by the real `privdiff` parser, so a renamed or dropped flag fails here; the first block is the
one CI runs.
"""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def _privdiff_commands() -> list[str]:
    commands = []
    for block in _blocks("bash")[1:]:  # the first block is CI's: install and demo
        for line in block.splitlines():
            for part in re.split(r"&&|;", line.split("  #")[0]):
                words = shlex.split(part.strip())
                if words[:1] == ["privdiff"]:
                    commands.append(part.strip())
    return commands


def test_the_readme_has_snippets():
    assert len(_blocks("python")) >= 2 and len(_privdiff_commands()) >= 8


@pytest.mark.parametrize("command", _privdiff_commands())
def test_every_privdiff_command_in_the_readme_parses(command):
    from privdiff.cli.parser import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.handler


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    from privdiff.models.loading import load_pipeline
    from privdiff.models.original_layout import save_single_file

    tiny = load_pipeline(base="tiny")
    save_single_file(pipeline=tiny, path=tmp_path / "v1-5-pruned-emaonly.safetensors")
    tiny.tokenizer.save_pretrained(tmp_path / "path" / "to" / "tokenizer")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_every_python_block_in_the_readme_runs(scratch, index):
    exec(compile(_blocks("python")[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
