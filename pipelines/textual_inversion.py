"""Textual Inversion core: new placeholder tokens whose embedding rows are the only trained weights.

A token `<my-style>` with k vectors is the k tokens `<my-style>`, `<my-style>_1`, ... (diffusers'
convention, which `load_textual_inversion` expands back). The new ids get rows in a `TrainableRows`
layer over the frozen token table, so the table itself provably never changes. SDXL has two text
encoders: the token gets rows in both (`Placeholders`), and the UNet sees both encodings
(`encode_prompts`), as the SDXL pipeline builds them.

Released files (each carrying its privacy record):
- diffusers: `{token: tensor[k, d]}` (`pipe.load_textual_inversion(path, token=token)`); for SDXL
  `{"clip_l": [k, d1], "clip_g": [k, d2]}`, loaded into each encoder by `load_embedding`;
- ComfyUI: `{"clip_l": tensor[k, d]}` (SD1; `clip_h` for SD2; `clip_l` + `clip_g` for SDXL), ready for
  `models/embeddings`;
- A1111 `.pt` on request (`string_to_param`, SD1/SD2), with a `.privacy.json` sidecar (no metadata in .pt).
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


def check_token_and_init_word(*, pipeline, token: str, num_vectors: int, init_word: str) -> None:
    """Refuse, before anything is written, a token that already means something or an initialiser
    that is not one token, in every text encoder of `pipeline`."""
    from ..models.embedding_rows import single_token_ids

    for tokenizer, _ in encoder_slots(pipeline):
        for name in placeholder_names(token=token, num_vectors=num_vectors):
            check_new_token(tokenizer=tokenizer, token=name)
        single_token_ids(tokenizer=tokenizer, words=[init_word], role="the initialiser word (--init-word)")


def add_placeholder_tokens(*, tokenizer, text_encoder, names: list[str], init_word: str):
    """Add `names` to the tokenizer and give them trainable rows initialised from `init_word`.

    Returns (TrainableRows layer, the new ids, the initialiser's embedding). Nothing is changed when
    a check fails: a name already in the vocabulary, or an initialiser that is not one token.
    """
    from ..models.embedding_rows import attach_trainable_rows, single_token_ids

    for name in names:
        check_new_token(tokenizer=tokenizer, token=name)
    (init_id,) = single_token_ids(tokenizer=tokenizer, words=[init_word], role="the initialiser word (--init-word)")
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


def comfy_key(text_encoder, *, second: bool = False) -> str:
    """ComfyUI's embedding key for a text encoder: clip_g for SDXL's second, clip_h for SD2's OpenCLIP
    (gelu), clip_l for OpenAI CLIP (quick_gelu: SD1, SDXL's first)."""
    if second:
        return "clip_g"
    return "clip_h" if text_encoder.config.hidden_act == "gelu" else "clip_l"


def encoder_slots(pipeline) -> list[tuple]:
    """(tokenizer, text_encoder) of each text encoder the UNet is conditioned on: one, or two for SDXL."""
    slots = [(pipeline.tokenizer, pipeline.text_encoder)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        slots.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    return slots


class Placeholders:
    """New placeholder tokens with trainable rows in every text encoder of a pipeline.

    The tokens live in copies of the tokenizers, so they never outlive the run; `restore()` puts the
    encoders' own tables back. `rows[i]` is encoder i's TrainableRows, `init[i]` its initialiser row.
    """

    def __init__(self, *, pipeline, names: list[str], init_word: str):
        import copy

        self.pipeline = pipeline
        self.tokenizers, self.text_encoders, self.rows, self.init = [], [], [], []
        for tokenizer, _ in encoder_slots(pipeline):
            for name in names:  # checked in every tokenizer before anything changes
                check_new_token(tokenizer=tokenizer, token=name)
        try:
            for tokenizer, text_encoder in encoder_slots(pipeline):
                tokenizer = copy.deepcopy(tokenizer)
                rows, _, init = add_placeholder_tokens(tokenizer=tokenizer, text_encoder=text_encoder, names=names,
                                                       init_word=init_word)
                self.tokenizers.append(tokenizer)
                self.text_encoders.append(text_encoder)
                self.rows.append(rows)
                self.init.append(init)
        except Exception:
            self.restore()
            raise

    @property
    def second(self) -> bool:
        return len(self.rows) > 1

    def prompt_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids for tokenizer in self.tokenizers]

    def restore(self) -> None:
        for text_encoder, rows in zip(self.text_encoders, self.rows):
            text_encoder.set_input_embeddings(rows.base)


def encode_prompts(*, pipeline, ids: list[torch.Tensor], image_size: int):
    """The UNet's text conditioning for token ids (one tensor per encoder): (context, added_cond_kwargs).

    SD1/SD2: the encoder's last hidden state. SDXL, as its pipeline does: both encoders' penultimate
    hidden states side by side, the second encoder's pooled projection and the size/crop time ids.
    """
    if len(ids) == 1:
        return pipeline.text_encoder(ids[0])[0], None
    first = pipeline.text_encoder(ids[0], output_hidden_states=True)
    second = pipeline.text_encoder_2(ids[1], output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    batch = ids[0].shape[0]
    time_ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=context.dtype,
                            device=context.device).expand(batch, -1)
    return context, {"text_embeds": second.text_embeds, "time_ids": time_ids}


def check_a1111(*, a1111: bool, num_encoders: int) -> None:
    """A1111's .pt holds one encoder's vectors: refuse it for SDXL (checked before training starts)."""
    if a1111 and num_encoders > 1:
        raise ValueError("A1111 reads SDXL embeddings as the clip_l/clip_g safetensors file: use the ComfyUI file "
                         "(leave out a1111).")


def save_embedding(*, vectors: list[torch.Tensor], token: str, text_encoders: list, out: str | Path, record,
                   stem: str = "learned_embeds", a1111: bool = False) -> dict[str, Path]:
    """Write the released embedding ([k, d] per text encoder) in diffusers and ComfyUI formats (and
    A1111 on request, for single-encoder models)."""
    from ..privacy.record import write_safetensors, write_sidecar

    vectors = [v.detach().float().cpu().contiguous() for v in vectors]
    keyed = {comfy_key(te, second=i == 1): v for i, (te, v) in enumerate(zip(text_encoders, vectors))}
    check_a1111(a1111=a1111, num_encoders=len(vectors))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "diffusers": write_safetensors(path=out / f"{stem}.safetensors",
                                       tensors={token: vectors[0]} if len(vectors) == 1 else keyed, record=record),
        "comfyui": write_safetensors(path=out / f"{stem}_comfyui.safetensors", tensors=keyed, record=record),
    }
    if a1111:
        path = out / f"{stem}_a1111.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors[0]}, "name": token,
                    "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
        write_sidecar(path=path, record=record)
        files["a1111"] = path
    return files


def load_embedding(*, pipeline, path: str | Path, token: str) -> None:
    """Load a released embedding into a diffusers pipeline under `token` (always pass the token).

    SDXL files hold one tensor per encoder (clip_l, clip_g); each goes into its own encoder."""
    from safetensors.torch import load_file

    if getattr(pipeline, "text_encoder_2", None) is None:
        pipeline.load_textual_inversion(str(path), token=token)
        return
    tensors = load_file(str(path))
    if set(tensors) != {"clip_l", "clip_g"}:
        raise ValueError(f"{path} holds {sorted(tensors)}; an SDXL embedding needs clip_l and clip_g.")
    pipeline.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipeline.text_encoder,
                                    tokenizer=pipeline.tokenizer)
    pipeline.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipeline.text_encoder_2,
                                    tokenizer=pipeline.tokenizer_2)
