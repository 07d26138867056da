"""Split one dataset across federated clients: IID, or non-IID by a Dirichlet(β) over labels.

Each label's examples are shared out among the clients in proportions drawn from Dirichlet(β, ..., β):
small β gives each client a few labels (the paper's non-IID setting), large β tends to IID. Labels are
a labelled set's `labels()` (digits) or, for any captioned dataset, its captions. Seeded: the same
(dataset, clients, β, seed) always gives the same partition.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    """Client i trains on `indices[i]` of the dataset."""

    indices: tuple[tuple[int, ...], ...]
    beta: float | None  # None: IID
    seed: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.indices)


def dataset_labels(dataset) -> list:
    """What a non-IID split groups by: `labels()` when the dataset has them, else its captions."""
    if hasattr(dataset, "labels"):
        return list(dataset.labels())
    if hasattr(dataset, "captions"):
        return list(dataset.captions())
    raise ValueError(f"{type(dataset).__name__} has neither labels() nor captions(): give labels explicitly.")


def check_partition_request(*, num_examples: int, num_clients: int, beta: float | None) -> None:
    """The checks `dirichlet_partition` makes, for use before any process starts."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be a whole number >= 1.")
    if num_clients > num_examples:
        raise ValueError(f"{num_clients} clients for {num_examples} examples: every client needs at least one "
                         "example; use fewer clients or more data.")
    if beta is not None and not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta={beta!r} must be positive (small: each client sees few labels; large: close to "
                         "IID), or None for an IID split.")


def dirichlet_partition(*, labels, num_clients: int, beta: float | None, seed: int = 0) -> Partition:
    """Share examples (given by their labels) among `num_clients` clients; every client gets at least one.

    beta=None: a uniformly random IID split into near-equal parts.
    """
    import numpy as np

    labels = list(labels)
    check_partition_request(num_examples=len(labels), num_clients=num_clients, beta=beta)
    rng = np.random.default_rng(seed)
    if beta is None:
        order = rng.permutation(len(labels))
        parts = [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]
        return Partition(indices=tuple(tuple(p) for p in parts), beta=None, seed=seed)
    classes = sorted(set(labels), key=repr)
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        members = rng.permutation(by_class[c])
        shares = rng.dirichlet([beta] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(int(i) for i in chunk)
    # A client left empty takes one example from the largest client (tiny β with few examples).
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda k: len(parts[k]))
            parts[client].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return Partition(indices=tuple(tuple(sorted(p)) for p in parts), beta=float(beta), seed=seed)


def label_skew(*, labels, partition: Partition) -> float:
    """Mean total-variation distance between each client's label distribution and the whole set's
    (0: IID; near 1: each client holds labels the others do not)."""
    from collections import Counter

    labels = list(labels)
    overall = Counter(labels)
    total = len(labels)
    distances = []
    for indices in partition.indices:
        local = Counter(labels[i] for i in indices)
        distances.append(0.5 * sum(abs(local[c] / len(indices) - overall[c] / total) for c in overall))
    return sum(distances) / len(distances)
