"""Train a few rows of a text encoder's token table and nothing else of it.

`TrainableRows` wraps the frozen `nn.Embedding`: ids listed in `row_ids` read their vector from the
trainable `rows` parameter, all other ids from the frozen table, so the rest of the table provably
stays unchanged and optimisers (and DP noise) touch only the chosen rows. Ids at or beyond the table's
size are allowed when listed (new placeholder tokens of Textual Inversion).

Per-sample gradients of `rows` are cheap and exact: sample b's gradient for row r is the sum of the
output gradients at the positions holding row r's id (`per_sample_gradients`, used by privdiff's
clipping and registered with opacus).
"""

from __future__ import annotations

import torch
from torch import nn


class TrainableRows(nn.Module):
    def __init__(self, *, base: nn.Embedding, row_ids, init: torch.Tensor | None = None):
        super().__init__()
        row_ids = torch.as_tensor(list(row_ids), dtype=torch.long)
        if row_ids.numel() == 0 or len(set(row_ids.tolist())) != row_ids.numel():
            raise ValueError("row_ids must be a non-empty list of distinct token ids.")
        self.base = base.requires_grad_(False)
        # Plain tensors, not buffers: opacus refuses trainable layers that hold buffers.
        self.row_ids = row_ids
        if init is None:
            if int(row_ids.max()) >= base.num_embeddings:
                raise ValueError("new token ids (beyond the table) need an `init` for their rows.")
            init = base.weight.detach()[row_ids]
        self.rows = nn.Parameter(init.detach().clone().to(base.weight.dtype))
        # id -> row index (or -1), as a dense lookup over every id that can occur
        lookup = torch.full((max(base.num_embeddings, int(row_ids.max()) + 1),), -1, dtype=torch.long)
        lookup[row_ids] = torch.arange(row_ids.numel())
        self.lookup = lookup

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (what code reading `.weight` of a token embedding expects)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.lookup.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        row = self.lookup.to(ids.device)[ids]
        hit = row >= 0
        out = self.base(torch.where(ids < self.base.num_embeddings, ids, torch.zeros_like(ids)))
        return torch.where(hit.unsqueeze(-1), self.rows[row.clamp(min=0)].to(out.dtype), out)

    def per_sample_gradients(self, ids: torch.Tensor, grad_output: torch.Tensor) -> dict:
        """{rows: [B, R, d]}: each sample's gradient of the trainable rows."""
        row = self.lookup.to(ids.device)[ids]  # [B, T]
        one_hot = torch.nn.functional.one_hot(row.clamp(min=0), self.rows.shape[0]).to(grad_output.dtype)
        one_hot = one_hot * (row >= 0).unsqueeze(-1).to(grad_output.dtype)
        return {self.rows: torch.einsum("btr,btd->brd", one_hot, grad_output)}

    def merged_table(self) -> torch.Tensor:
        """The full table with the trained rows written in (rows beyond the base table are appended)."""
        table = self.base.weight.detach().clone()
        extra = self.num_embeddings - table.shape[0]
        if extra > 0:
            table = torch.cat([table, table.new_zeros(extra, table.shape[1])])
        table[self.row_ids.to(table.device)] = self.rows.detach().to(table.dtype)
        return table


def attach_trainable_rows(*, text_encoder, row_ids, init: torch.Tensor | None = None) -> TrainableRows:
    """Replace the text encoder's token embedding by `TrainableRows` (idempotent on the base table)."""
    current = text_encoder.get_input_embeddings()
    base = current.base if isinstance(current, TrainableRows) else current
    wrapped = TrainableRows(base=base, row_ids=row_ids, init=init)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def single_token_ids(*, tokenizer, words, role: str = "conditioning words") -> list[int]:
    """The token id of each word, refusing words the tokenizer splits into several tokens (`role`
    names them in the message: conditioning words, the initialiser word...)."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(f"{word!r} is {len(pieces)} tokens for this tokenizer; {role} must be single tokens "
                             "(pick another word).")
        ids.append(pieces[0])
    return ids
