"""Textual Inversion core: new placeholder tokens whose embedding rows are the only trained weights.

A token `<my-style>` with k vectors is the k tokens `<my-style>`, `<my-style>_1`, ... (diffusers'
convention, which `load_textual_inversion` expands back). The new ids get rows in a `TrainableRows`
layer over the frozen token table, so the table itself provably never changes.

Released files (each carrying its privacy record):
- diffusers: `{token: tensor[k, d]}` (`pipe.load_textual_inversion(path, token=token)`);
- ComfyUI: `{"clip_l": tensor[k, d]}` (SD1), ready for `models/embeddings`;
- A1111 `.pt` on request (`string_to_param`), with a `.privacy.json` sidecar (no metadata in .pt).
"""

from __future__ import annotations

from pathlib import Path

import torch


def placeholder_names(*, token: str, num_vectors: int) -> list[str]:
    if num_vectors < 1:
        raise ValueError(f"num_vectors={num_vectors} must be at least 1.")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_token(prompt: str, *, token: str, num_vectors: int) -> str:
    """Write a multi-vector token out as its k placeholder tokens, as diffusers does at inference."""
    return prompt.replace(token, " ".join(placeholder_names(token=token, num_vectors=num_vectors)))


def check_new_token(*, tokenizer, token: str) -> None:
    """Refuse a placeholder that already means something: a vocabulary entry (with or without CLIP's
    end-of-word mark) or an added token."""
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        raise ValueError(f"token {token!r} is already in the vocabulary; choose a new one, e.g. "
                         f"'<my-{token.strip('<>')}>'.")


def add_placeholder_tokens(*, tokenizer, text_encoder, names: list[str], init_word: str):
    """Add `names` to the tokenizer and give them trainable rows initialised from `init_word`.

    Returns (TrainableRows layer, the new ids, the initialiser's embedding). Nothing is changed when
    a check fails: a name already in the vocabulary, or an initialiser that is not one token.
    """
    from ..models.embedding_rows import attach_trainable_rows, single_token_ids

    for name in names:
        check_new_token(tokenizer=tokenizer, token=name)
    (init_id,) = single_token_ids(tokenizer=tokenizer, words=[init_word])
    table = text_encoder.get_input_embeddings()
    init = table.weight.detach()[init_id].clone()
    added = tokenizer.add_tokens(list(names))
    if added != len(names):
        raise ValueError(f"the tokenizer added {added} of {len(names)} placeholder tokens; use distinct new names.")
    ids = tokenizer.convert_tokens_to_ids(list(names))
    text_encoder.requires_grad_(False)
    rows = attach_trainable_rows(text_encoder=text_encoder, row_ids=ids, init=init.expand(len(ids), -1))
    rows.rows.requires_grad_(True)
    return rows, ids, init


def comfy_key(text_encoder) -> str:
    """ComfyUI's embedding key for this text encoder: clip_l (SD1) or clip_h (SD2's OpenCLIP-H)."""
    return "clip_h" if text_encoder.config.hidden_size == 1024 else "clip_l"


def save_embedding(*, vectors: torch.Tensor, token: str, text_encoder, out: str | Path, record,
                   stem: str = "learned_embeds", a1111: bool = False) -> dict[str, Path]:
    """Write the released embedding [k, d] in diffusers and ComfyUI formats (and A1111 on request)."""
    from ..privacy.record import write_safetensors, write_sidecar

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = vectors.detach().float().contiguous()
    files = {
        "diffusers": write_safetensors(path=out / f"{stem}.safetensors", tensors={token: vectors}, record=record),
        "comfyui": write_safetensors(path=out / f"{stem}_comfyui.safetensors",
                                     tensors={comfy_key(text_encoder): vectors}, record=record),
    }
    if a1111:
        path = out / f"{stem}_a1111.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token,
                    "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
        write_sidecar(path=path, record=record)
        files["a1111"] = path
    return files


def load_embedding(*, pipeline, path: str | Path, token: str) -> None:
    """Load a released embedding into a diffusers pipeline under `token` (always pass the token)."""
    pipeline.load_textual_inversion(str(path), token=token)
