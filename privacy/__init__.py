"""Differential-privacy building blocks: accountants, noise calibration and the privacy record.

Importing this package is cheap: opacus, dp_accounting and safetensors load only when a function
that needs them runs. Nothing here imports ComfyUI or ``privdiff.transport``.
"""

from .accounting import (
    ACCOUNTANTS,
    ADJACENCIES,
    Accountant,
    Segment,
    analytic_gaussian_delta,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    calibrate_noise_multiplier,
    check_adjacency,
    check_delta,
    check_epsilon,
    default_accountant,
    delta_for,
    epsilon,
    gaussian_aggregate_epsilon,
    history_epsilon,
)
from .record import (
    DP_MECHANISMS,
    MECHANISMS,
    METADATA_KEY,
    PRIVACY_UNITS,
    SIDECAR_SUFFIX,
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
