import socket

import pytest

from privdiff.models.tokenizer import (
    DEFAULT_WORDS,
    EOS_TOKEN,
    build_clip_tokenizer,
    load_clip_tokenizer,
    save_clip_tokenizer,
)


def test_every_listed_word_is_one_token():
    tok = build_clip_tokenizer()
    for word in DEFAULT_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # bos, word, eos
        assert tok.convert_ids_to_tokens(ids)[1] == word + "</w>"


def test_clip_conventions():
    tok = build_clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.eos_token_id == len(tok) - 1, "SD1 text encoders pool at the highest id"
    assert tok.bos_token_id == len(tok) - 2
    assert tok.pad_token == EOS_TOKEN
    padded = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id
    # Case and spacing are normalised, as in OpenAI's CLIP tokenizer.
    assert tok("A  RED circle").input_ids == tok("a red circle").input_ids


def test_unknown_words_fall_back_to_bytes_not_unk():
    tok = build_clip_tokenizer()
    ids = tok("zyxq").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "zyxq"


def test_deterministic_and_extra_words():
    a, b = build_clip_tokenizer(), build_clip_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    c = build_clip_tokenizer(extra_words=("octopus",))
    assert len(c("octopus").input_ids) == 3
    assert len(a("octopus").input_ids) > 3


def test_save_and_load_round_trip(tmp_path):
    tok = build_clip_tokenizer()
    folder = save_clip_tokenizer(tok, tmp_path / "tokenizer")
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    text = "a light blue triangle on a dark green background"
    assert load_clip_tokenizer(folder)(text).input_ids == tok(text).input_ids
    # The classic pair alone (as older SD folders ship it) gives the same ids.
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert load_clip_tokenizer(folder)(text).input_ids == tok(text).input_ids


def test_load_rejects_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        load_clip_tokenizer(tmp_path)


def test_network_guard_blocks_outside_addresses():
    with pytest.raises(ConnectionError, match="only 127.0.0.0/8"):
        socket.create_connection(("8.8.8.8", 53), timeout=1)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
