"""[8] defect 2: DPAgg-TI's sensitivity, attacked as an outsider would with the public API.

The release is init + (sum of clipped unit embeddings + noise) / (q·n). Its guarantee assumes that
adding one image to the data adds one unit and leaves every other unit's embedding exactly as it
was, so the clipped sum moves by at most C. The outsider trains twice through the public API with
the noise off (the no-DP comparison mode runs the same training), on D and on D plus one image, and
reads the sum back out of the two released files: ‖S(D′) − S(D)‖ must stay within C. privdiff 0.1
drew every unit's order, steps, noise and timesteps from one stream seeded by `--seed` and shaped by
the number of units, so one added image moved every unit: 2.27·C at n = 64.

The white-box checks take the per-unit embeddings themselves (a by-product that is never released)
and demand bit-identity for every shared unit, for per-image and per-subject units, with and without
Poisson subsampling; per-subset runs must record the sensitivity they have, subject runs `subject`.
"""

import pytest
import torch
from safetensors.torch import load_file

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ti import DPAggConfig, train_dpagg_ti
from privdiff.privacy.record import read_record

TOKEN = "<adv-style>"


def _pipe():
    pipeline = tiny_pipeline(spec=TinySpec(), seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class _First:
    """The first `n` items of a dataset (D), the same items in the same order as in D′."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def subjects(self):
        return self.dataset.subjects()[:self.n]


def _released_sum(files, *, n, clip, center=True):
    """S = (release − init)·n, read from the released diffusers file (the outsider's view)."""
    pipe = _pipe()
    init_id = pipe.tokenizer.convert_tokens_to_ids("painting</w>")
    init = pipe.text_encoder.get_input_embeddings().weight.detach()[init_id].double()
    release = load_file(str(files["diffusers"]))[TOKEN].double()
    return (release - init) * n


def test_one_added_image_moves_the_released_sum_by_at_most_c(tmp_path):
    from privdiff.data import load_dataset

    n, clip = 12, 0.5
    full = load_dataset(data="style", num_items=n + 1, seed=0)
    config = DPAggConfig(token=TOKEN, epsilon=None, clip_norm=clip, steps=8, batch_size=8, learning_rate=5e-2,
                         secure_noise=False)
    d = train_dpagg_ti(base=_pipe(), data=_First(full, n), out=tmp_path / "d", config=config)
    d_plus = train_dpagg_ti(base=_pipe(), data=full, out=tmp_path / "d-plus", config=config)
    s_d = _released_sum(d.files, n=n, clip=clip)
    s_plus = _released_sum(d_plus.files, n=n + 1, clip=clip)
    moved = float((s_plus - s_d).norm())
    # float32 files: the sum is read back to about 1e-5 of C.
    assert moved <= clip * (1 + 1e-3), f"one added image moved the clipped sum by {moved / clip:.2f}·C"


def _unit_embeddings(dataset, *, privacy_unit="example", num_subsets=None, secret=b"\x07" * 32):
    from privdiff.pipelines.dpagg_units import make_units, train_unit_embeddings

    units = make_units(dataset=dataset, secret=secret, privacy_unit=privacy_unit, num_subsets=num_subsets)
    trained = train_unit_embeddings(pipeline=_pipe(), dataset=dataset, units=units, secret=secret,
                                    template="a picture in the style of {token}", init_word="painting", num_vectors=1,
                                    steps=3, batch_size=4, learning_rate=5e-2)
    return {unit.name: trained.embeddings[i] for i, unit in enumerate(units)}, units


@pytest.mark.parametrize("privacy_unit", ["example", "subject"])
def test_every_shared_unit_is_bit_identical_on_d_and_d_plus_one(privacy_unit):
    from privdiff.data import load_dataset

    n = 9
    full = load_dataset(data="style", num_items=n + 3, seed=0, num_subjects=n + 3 if privacy_unit == "subject" else 0)
    # D′ adds one image (one new subject) and, to be sure position plays no part, shuffles D's order.
    d = _First(full, n)
    order = [n] + list(range(n - 1, -1, -1))

    class _Shuffled(_First):
        def __getitem__(self, i):
            return full[order[i]]

        def subjects(self):
            return [full.subjects()[j] for j in order]

    d_plus = _Shuffled(full, n + 1)
    on_d, _ = _unit_embeddings(d, privacy_unit=privacy_unit)
    on_plus, units_plus = _unit_embeddings(d_plus, privacy_unit=privacy_unit)
    assert len(on_plus) == len(on_d) + 1 and set(on_d) < set(on_plus)
    for name, embedding in on_d.items():
        assert torch.equal(embedding, on_plus[name]), f"unit {name[:8]} changed when one image was added"
    init_changed = [name for name, e in on_d.items() if not torch.equal(e, next(iter(on_d.values())))]
    assert init_changed, "the units trained (their embeddings differ)"


def test_subsampling_and_release_noise_never_touch_the_units():
    """Poisson subsampling happens after training, from the noise generator: the units are the same
    whatever q is, so the run on D and D′ with q < 1 shares them too (white-box: the release path)."""
    from privdiff.data import load_dataset
    from privdiff.pipelines.dp_ti import aggregate

    data = load_dataset(data="style", num_items=6, seed=0)
    embeddings, _ = _unit_embeddings(data)
    stacked = torch.stack(list(embeddings.values()))
    init = torch.zeros(stacked.shape[-1])
    for q in (1.0, 0.5):
        aggregate(embeddings=stacked, init=init, clip=0.5, noise_multiplier=1.0, sample_rate=q,
                  generator=torch.Generator().manual_seed(1))
    again, _ = _unit_embeddings(data)
    assert all(torch.equal(embeddings[k], again[k]) for k in embeddings)


def test_subsets_change_one_unit_and_are_recorded_as_replace_one(tmp_path):
    from privdiff.data import load_dataset
    from privdiff.privacy.accounting import analytic_gaussian_epsilon

    n = 10
    full = load_dataset(data="style", num_items=n + 1, seed=0)
    on_d, units_d = _unit_embeddings(_First(full, n), num_subsets=3)
    on_plus, units_plus = _unit_embeddings(full, num_subsets=3)
    assert set(on_d) == set(on_plus) and len(on_d) == 3
    changed = [name for name in on_d if not torch.equal(on_d[name], on_plus[name])]
    assert len(changed) == 1, "adding one image changes exactly one subset's embedding"
    result = train_dpagg_ti(base=_pipe(), data=full, out=tmp_path / "subsets", config=DPAggConfig(
        token=TOKEN, epsilon=1.0, delta=1e-3, num_subsets=3, steps=1, batch_size=3, secure_noise=False))
    record = read_record(result.files["diffusers"])
    assert (record.adjacency, record.accounted_adjacency, record.num_examples) == ("add-remove", "replace-one", n + 1)
    # Replace-one over subsets: the sum moves by up to 2C, so σ is twice the add-remove σ.
    assert analytic_gaussian_epsilon(noise_multiplier=record.noise_multiplier / 2, delta=1e-3) == pytest.approx(1.0,
                                                                                                                  rel=1e-6)


def test_subject_runs_record_the_subject_unit(tmp_path):
    from privdiff.data import load_dataset

    data = load_dataset(data="style", num_items=6, seed=0, num_subjects=3)
    result = train_dpagg_ti(base=_pipe(), data=data, out=tmp_path / "subjects", config=DPAggConfig(
        token=TOKEN, epsilon=1.0, delta=1e-2, steps=1, batch_size=3, privacy_unit="subject", secure_noise=False))
    record = read_record(result.files["diffusers"])
    assert (record.privacy_unit, record.num_examples, record.adjacency) == ("subject", 3, "add-remove")
