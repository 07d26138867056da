"""A CLIP-style BPE tokenizer built in code, for privdiff-tiny and for tests.

Real checkpoints bring their own vocabulary (a diffusers folder's `tokenizer/`, or ComfyUI's CLIP
object); privdiff's own small model needs one that exists without any download. We train a byte-level
BPE on a word list with the `tokenizers` library (milliseconds) and lay it out the way OpenAI's CLIP
vocabulary is laid out: 256 byte symbols, the same with the end-of-word marker `</w>`, then one token
per merge, then `<|startoftext|>` and `<|endoftext|>` last. Every listed word becomes one token and any
other text still tokenizes (byte fallback), so nothing maps to an unknown token.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# The words privdiff's procedural sets and later features use, plus common English glue words.
# Changing this list changes token ids: the shipped model's tokenizer files are saved beside its
# weights, so this list only matters for models built in code.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    a an the of on in at with and or by to from for is are this that it its
    red orange yellow green blue purple pink brown black white gray grey cyan magenta teal navy
    olive maroon lime gold silver beige light dark bright pale deep
    circle square triangle star diamond cross hexagon ring heart rectangle ellipse shape shapes
    small large big tiny medium left right top bottom center centre middle corner upper lower
    background foreground outline filled plain solid striped dotted checkered
    photo picture image drawing painting sketch render art artwork illustration
    style texture palette pattern colour color colors colours
    handwritten digit number zero one two three four five six seven eight nine
    0 1 2 3 4 5 6 7 8 9
    person face portrait object product scan
    letter capital sign mark ampersand question plus hash percent exclamation asterisk equals dollar
    stripes horizontal vertical diagonal gradient smooth
    """.split()
)


def _clip_pre_tokenizer():
    from tokenizers import Regex, normalizers, pre_tokenizers

    # Same normalisation and pre-tokenisation as transformers' CLIPTokenizer, so merges learnt
    # here apply identically there.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, splitter


def _train_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE until every word is one symbol; ties broken by the pair itself.

    Written out rather than taken from `tokenizers.trainers.BpeTrainer`, whose tie-breaking
    changes from run to run: token ids must be identical for a given word list.
    """
    from tokenizers import pre_tokenizers

    normalizer, splitter = _clip_pre_tokenizer()
    pieces = sorted({p for w in words for p, _ in splitter.pre_tokenize_str(normalizer.normalize_str(w))})
    # Each piece as a list of symbols, the last carrying the end-of-word marker.
    symbols = [list(p[:-1]) + [p[-1] + "</w>"] for p in pieces if p]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in symbols:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, seq in enumerate(symbols):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            symbols[i] = out
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ordered = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(ordered))}
    return vocab, merges


def build_clip_tokenizer(*, words: tuple[str, ...] | list[str] = DEFAULT_WORDS, extra_words: tuple[str, ...] = ()):
    """Return a transformers `CLIPTokenizer` whose vocabulary holds every word as one token.

    `<|endoftext|>` is the last id and also the padding token, as in SD 1.x, so a text encoder
    built with `eos_token_id=len(vocab) - 1` pools at the right place.
    """
    from transformers import CLIPTokenizer

    all_words = tuple(words) + tuple(extra_words)
    if not all_words:
        raise ValueError("build_clip_tokenizer needs at least one word; pass words=DEFAULT_WORDS or your own list.")
    vocab, merges = _train_bpe(all_words)
    # transformers 5 ignores vocab_file=/merges_file=: the contents must be passed directly.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


def save_clip_tokenizer(tokenizer, directory: str | Path) -> Path:
    """Save a CLIP tokenizer as a standard folder: tokenizer.json plus vocab.json and merges.txt.

    The classic vocab.json/merges.txt pair is what older loaders (and ComfyUI's SDTokenizer on
    older transformers) read; tokenizer.json is what transformers 5 reads.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def load_clip_tokenizer(directory: str | Path):
    """Load a CLIP tokenizer folder (tokenizer.json, or vocab.json + merges.txt) with no network."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    has_fast = (directory / "tokenizer.json").is_file()
    has_pair = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    if not (has_fast or has_pair):
        raise FileNotFoundError(
            f"{directory} is not a CLIP tokenizer folder: it needs tokenizer.json, or vocab.json and merges.txt "
            "(the `tokenizer/` folder of a diffusers Stable Diffusion model has them)."
        )
    if has_fast:
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True, model_max_length=MODEL_MAX_LENGTH)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
