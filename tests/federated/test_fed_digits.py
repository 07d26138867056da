"""Federated diffusion's utility on `digits` (slow: about 6 minutes on 2 cores)."""

import argparse

import pytest

pytest.importorskip("flwr", reason="federated diffusion needs Flower")
pytestmark = pytest.mark.slow


def test_fedavg_on_digits_lowers_held_out_loss_and_beats_the_base_models_accuracy(load_bench, tmp_path):
    args = argparse.Namespace(out=str(tmp_path), num_items=600, num_clients=3, rounds=6, beta=None, seed=0,
                              trainable="attention", local_epochs=5.0, batch_size=50, learning_rate=3e-3, digit_words=True,
                              eval_num=200)
    result = load_bench("federated").digits(args)
    losses = result["heldout_loss"]
    assert losses["6"] < losses["1"] < losses["0"], losses
    assert result["federated"]["digit_accuracy"] > result["base"]["digit_accuracy"] + 0.05, result
