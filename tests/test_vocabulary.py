"""One name per concept: configs, CLI and run configs use the current names; former names still work
for one release, with a notice, and runs checkpointed under them still resume."""

import argparse
import dataclasses
import json

import pytest

from privdiff.cli import main
from privdiff.cli.parser import build_parser
from privdiff.federated.fedavg import FederatedConfig
from privdiff.pipelines.dp_ti import DPAggConfig, DPSGDTIConfig
from privdiff.pipelines.split_run import SplitTrainConfig
from privdiff.training.fine_tune import DPLDMConfig
from privdiff.vocabulary import FORMER_FLAGS, FORMER_NAMES, current_names, legacy_repr

CONFIGS = (DPLDMConfig, DPAggConfig, DPSGDTIConfig, FederatedConfig, SplitTrainConfig)
FORMER = {old for olds in FORMER_NAMES.values() for old in olds}


def _leaves(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _leaves(child)
    if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        yield parser


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_no_config_field_has_a_former_name(config):
    assert not {f.name for f in dataclasses.fields(config)} & FORMER


def test_the_command_line_shows_only_current_flags():
    for leaf in _leaves(build_parser()):
        for action in leaf._actions:
            shown = action.help is not argparse.SUPPRESS
            for flag in action.option_strings:
                assert (flag in FORMER_FLAGS) != shown, f"{leaf.prog} {flag}"
        help_text = leaf.format_help()
        assert not any(f"{old} " in help_text for old in FORMER_FLAGS), leaf.prog


@pytest.mark.parametrize("argv, dest, value", [
    (["train", "dp-ldm", "--data", "shapes", "--out", "o", "--max-grad-norm", "0.05"], "clip_norm", 0.05),
    (["train", "dp-ldm", "--data", "shapes", "--out", "o", "--lr", "3e-4"], "learning_rate", 3e-4),
    (["train", "dp-ti", "--data", "shapes", "--out", "o", "--token", "<s>", "--clip", "0.7"], "clip_norm", 0.7),
    (["fed", "simulate", "--out", "o", "--clients", "4"], "num_clients", 4),
    (["fed", "simulate", "--out", "o", "--client-dp-noise", "1.5"], "client_noise_multiplier", 1.5),
    (["fed", "simulate", "--out", "o", "--client-dp-clip", "0.3"], "client_clip_norm", 0.3),
    (["fed", "simulate", "--out", "o", "--client-dp-delta", "1e-6"], "client_delta", 1e-6),
])
def test_a_former_flag_sets_the_current_option_with_a_notice(argv, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert len(args.former_flags) == 1 and "former name" in args.former_flags[0]


def test_current_flags_leave_no_notice_and_each_method_keeps_its_default():
    ti = build_parser().parse_args(["train", "dp-ti", "--data", "shapes", "--out", "o", "--token", "<s>"])
    assert ti.clip_norm is None and ti.former_flags == ()  # None: DPAgg's 0.5 or DP-SGD's 0.01
    assert DPAggConfig().clip_norm == 0.5 and DPSGDTIConfig().clip_norm == 0.01
    ldm = build_parser().parse_args(["train", "dp-ldm", "--data", "shapes", "--out", "o"])
    assert ldm.clip_norm == DPLDMConfig().clip_norm and ldm.learning_rate == DPLDMConfig().learning_rate


def test_the_command_prints_the_notice_once(tmp_path, capsys):
    # --num-items 0 is refused before anything loads: the notice must still come first, once.
    code = main(["train", "dp-ldm", "--data", "shapes", "--num-items", "0", "--out", str(tmp_path / "o"),
                 "--max-grad-norm", "0.05"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("--max-grad-norm is the former name of --clip-norm") == 1, err


def test_run_configs_and_settings_files_take_former_names(tmp_path, capsys):
    config = FederatedConfig.from_run_config({"client-dp-noise-multiplier": 1.0, "client-dp-clipping-norm": 0.2,
                                              "num-clients": 2})
    assert config.client_noise_multiplier == 1.0 and config.client_clip_norm == 0.2
    assert "'client-dp-clipping-norm' is the former name of 'client-clip-norm'" in capsys.readouterr().err
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"local_max_grad_norm": 0.05, "num_clients": 2}))
    assert FederatedConfig.from_file(settings).local_clip_norm == 0.05
    with pytest.raises(ValueError, match="both 'client_dp_clip' and 'client_clip_norm'"):
        current_names({"client_dp_clip": 1, "client_clip_norm": 2}, known={"client_clip_norm"}, where="x")


def test_checkpoint_fingerprints_keep_the_names_runs_were_started_with():
    """A run checkpointed before the rename fingerprinted its settings under the former names; the
    fingerprint still uses them, so that run resumes."""
    agg = DPAggConfig(clip_norm=0.3)
    assert legacy_repr(agg, renamed={"clip_norm": "clip"}) == repr(agg).replace("clip_norm=", "clip=")
    assert "clip=0.3" in legacy_repr(agg, renamed={"clip_norm": "clip"})
    sgd = DPSGDTIConfig(clip_norm=0.02)
    assert "max_grad_norm=0.02" in legacy_repr(sgd, renamed={"clip_norm": "max_grad_norm"})
    from privdiff.training.fine_tune import FineTuneRun

    run = object.__new__(FineTuneRun)  # only the fingerprint is looked at: no model needed
    run.config, run.num_examples = DPLDMConfig(clip_norm=0.02), 100
    assert run._fingerprint()["max_grad_norm"] == 0.02 and "clip_norm" not in run._fingerprint()
