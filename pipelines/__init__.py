"""Trainers and diffusers pipelines, one module per method, plus the demo.

    from privdiff.pipelines import DPLDMPipeline, SplitControlNetPipeline

The names below are imported on first use (PEP 562), so importing one trainer's module does not
load every method's dependencies.
"""

from importlib import import_module

_EXPORTS = {
    "DPLDMPipeline": "fine_tuned",
    "SplitControlNetPipeline": "split_pipeline",
    "apply_fine_tune": "fine_tuned",
    "train_dp_ldm": "dp_ldm",
    "DPLDMConfig": "dp_ldm",
    "train_dpagg_ti": "dp_ti",
    "DPAggConfig": "dp_ti",
    "train_dpsgd_ti": "dp_ti",
    "DPSGDTIConfig": "dp_ti",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
