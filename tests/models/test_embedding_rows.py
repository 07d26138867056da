"""Trainable token rows: only the chosen rows change, and their per-sample gradients are exact
for privdiff's clipping and for opacus."""

import pytest
import torch
from torch import nn

from privdiff.models.embedding_rows import TrainableRows, single_token_ids
from privdiff.privacy.clipping import GradSampleClipper
from privdiff.privacy.opacus_backend import OpacusClipper


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, ids):
        return self.proj(torch.tanh(self.table(ids))).pow(2).mean(dim=(1, 2))


def _model():
    model = TextModel().double()
    model.proj.requires_grad_(False)
    model.table = TrainableRows(base=model.table, row_ids=[3, 7, 21], init=torch.randn(3, 6, dtype=torch.float64))
    return model


def test_only_the_rows_change_and_new_ids_are_served():
    model = _model()
    before = model.table.base.weight.detach().clone()
    ids = torch.tensor([[1, 3, 21, 3]])
    out = model.table(ids)
    assert torch.equal(out[0, 0], before[1]) and torch.equal(out[0, 1], model.table.rows[0])
    assert torch.equal(out[0, 2], model.table.rows[2])
    opt = torch.optim.SGD([model.table.rows], lr=1.0)
    model(ids).sum().backward()
    opt.step()
    assert torch.equal(model.table.base.weight, before)
    merged = model.table.merged_table()
    assert merged.shape == (22, 6) and torch.equal(merged[3], model.table.rows[0].detach())
    with pytest.raises(ValueError, match="need an `init`"):
        TrainableRows(base=nn.Embedding(5, 2), row_ids=[9])


@pytest.mark.parametrize("backend", [GradSampleClipper, OpacusClipper])
def test_per_sample_clipping_matches_a_loop(backend):
    model = _model()
    ids = torch.tensor([[3, 3, 7, 1], [21, 2, 2, 2], [7, 3, 21, 0], [4, 5, 6, 8]])
    clip = 0.02
    expected = torch.zeros_like(model.table.rows)
    for i in range(4):
        model.zero_grad()
        model(ids[i:i + 1]).sum().backward()
        grad = model.table.rows.grad.clone()
        expected += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
    model.zero_grad()
    clipper = backend(module=model, max_grad_norm=clip)
    model(ids).sum().backward()
    clipper.clip_and_accumulate()
    assert torch.allclose(clipper.summed_grad[model.table.rows], expected, rtol=1e-6, atol=1e-12)


def test_conditioning_words_must_be_single_tokens():
    from privdiff.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    ids = single_token_ids(tokenizer=tokenizer, words=["digit", "3"])
    assert len(ids) == 2 and ids[0] != ids[1]
    with pytest.raises(ValueError, match="single tokens"):
        single_token_ids(tokenizer=tokenizer, words=["zxqvbn"])
