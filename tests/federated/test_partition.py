"""Dirichlet(β) partitions: seeded, complete, every client served, skew falling with β; bad requests refused."""

import pytest

from privdiff.federated.partition import dirichlet_partition, label_skew

LABELS = [i % 10 for i in range(500)]


@pytest.mark.parametrize("beta", [None, 0.1, 1.0, 5.0])
def test_every_example_goes_to_exactly_one_client_and_each_client_gets_some(beta):
    part = dirichlet_partition(labels=LABELS, num_clients=5, beta=beta, seed=3)
    flat = [i for indices in part.indices for i in indices]
    assert sorted(flat) == list(range(len(LABELS)))
    assert min(part.sizes) >= 1 and len(part.indices) == 5
    assert part == dirichlet_partition(labels=LABELS, num_clients=5, beta=beta, seed=3)  # seeded
    assert part != dirichlet_partition(labels=LABELS, num_clients=5, beta=beta, seed=4)


def test_small_beta_skews_labels_and_large_beta_is_close_to_iid():
    skew = {beta: label_skew(labels=LABELS, partition=dirichlet_partition(labels=LABELS, num_clients=5, beta=beta,
                                                                         seed=0))
            for beta in (0.1, 5.0)}
    iid = label_skew(labels=LABELS, partition=dirichlet_partition(labels=LABELS, num_clients=5, beta=None, seed=0))
    assert skew[0.1] > 0.5 > 0.2 > skew[5.0] and iid < 0.15, (skew, iid)


def test_more_clients_than_examples_and_bad_beta_are_clear_errors():
    with pytest.raises(ValueError, match="at least one example"):
        dirichlet_partition(labels=[0, 1, 2], num_clients=4, beta=1.0)
    for beta in (0, -1.0):
        with pytest.raises(ValueError, match="must be positive"):
            dirichlet_partition(labels=LABELS, num_clients=3, beta=beta)
    with pytest.raises(ValueError, match="whole number"):
        dirichlet_partition(labels=LABELS, num_clients=0, beta=1.0)


def test_tiny_beta_with_few_examples_still_serves_every_client():
    part = dirichlet_partition(labels=[0] * 6 + [1] * 6, num_clients=6, beta=0.01, seed=0)
    assert min(part.sizes) >= 1 and sum(part.sizes) == 12
