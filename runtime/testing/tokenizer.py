"""Small text tokenizers in the transformers format, laid out like LLaDA2.0-Uni's, built in milliseconds.

Two builders:

- `write_tiny_tokenizer`: a byte-level BPE trained on a short built-in corpus (plus caller words). It
  encodes any text, carries the model's special-token strings as added special tokens, and has a fixed
  text vocabulary so that image codes start right after it (`image_token_offset == text_vocab_size`).
- `write_real_layout_tokenizer`: the special tokens at the ids of the real checkpoint (MODEL_SPEC §5)
  inside a 157184-entry text vocabulary of placeholders; for checking the real-vocabulary rules without
  the real files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
IMAGE_START_TOKEN = "<|image|>"
IMAGE_END_TOKEN = "<|/image|>"
BOI_TOKEN = "<boi>"
ROLE_MARKERS = ("<role>", "</role>")


def grid_token(size: int) -> str:
    """Return the string of the token that writes a grid height or width of `size` in an image header."""
    return f"<|reserved_token_{size}|>"


def image_code_token(code: int) -> str:
    """Return the string of the token that stands for image code `code` (ids image_token_offset + code)."""
    return f"<IMAGE{code}>"


# Short, varied English so that the trained merges cover common words; any text still encodes bytewise.
_CORPUS = (
    "A red circle above a blue square on a white background.",
    "Two green triangles and one yellow star, left of a small black dot.",
    "The picture shows a large purple rectangle below an orange ring.",
    "What colour is the shape in the top left corner? It is red.",
    "How many circles are there in the image? There are three circles.",
    "Draw a cat sitting on a windowsill at sunset, warm light, soft shadows.",
    "You are a text-to-image generation assistant.",
    "You are a text-to-image generation assistant with a thinking process.",
    "You are a multimodal understanding assistant.",
    "You are an image editing assistant. Make the square green.",
    "You are an interleaved text and image assistant.",
    "SYSTEM HUMAN ASSISTANT <uncondition>",
    "First I will think about the layout, then I will draw the scene step by step.",
    "the of and to in is it that for on with as was at by this from be are or",
    "0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024",
)


# The byte-level pre-tokenizer's word pattern (GPT-2's) with letters joined by hyphens kept as one word.
_HYPHENATED_WORDS = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+(?:-\p{L}+)*| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                     r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class TinyTokenizerInfo:
    """Sizes of a tokenizer written by `write_tiny_tokenizer`, for building a matching backbone config."""

    text_vocab_size: int
    image_token_offset: int
    num_image_codes: int
    vocab_size: int


def write_tiny_tokenizer(
    folder: str | Path,
    *,
    words: Iterable[str] = (),
    num_image_codes: int = 64,
    max_grid: int = 64,
    text_vocab_size: int = 512,
    special_role_markers: bool = True,
    whole_hyphenated_words: bool = False,
) -> TinyTokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`; return sizes.

    Ids: BPE tokens, then the special tokens (eos, mask, image markers, `<boi>`, role markers unless
    `special_role_markers` is False, grid tokens `<|reserved_token_n|>` for n in 0..max_grid), then
    `<|unused_k|>` padding up to `text_vocab_size`, then one `<IMAGE{c}>` token per image code.
    With `whole_hyphenated_words`, words joined by hyphens ("top-left") are not split at the hyphen before
    BPE, so a frequent one can become a single token.
    """
    if num_image_codes < 1 or max_grid < 1:
        raise ValueError("num_image_codes and max_grid must be positive")
    # (token, special) in id order; role markers are plain added tokens when they are not special.
    head = [(t, True) for t in (EOS_TOKEN, MASK_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, BOI_TOKEN)]
    head += [(t, special_role_markers) for t in ROLE_MARKERS]
    head += [(grid_token(n), True) for n in range(max_grid + 1)]
    bpe_budget = text_vocab_size - len(head)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_budget < len(alphabet):
        raise ValueError(
            f"text_vocab_size {text_vocab_size} leaves {bpe_budget} ids for BPE; it needs at least "
            f"{len(alphabet)} (the byte alphabet) beside {len(head)} added tokens"
        )

    tokenizer = Tokenizer(models.BPE())
    if whole_hyphenated_words:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_HYPHENATED_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_budget, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    tokenizer.train_from_iterator([*_CORPUS, *words], trainer=trainer)

    # A small corpus may yield fewer merges than the budget: pad so the image offset stays fixed.
    padding = text_vocab_size - tokenizer.get_vocab_size() - len(head)
    tail = [f"<|unused_{k}|>" for k in range(padding)] + [image_code_token(c) for c in range(num_image_codes)]
    # One call per run of equally special tokens: each call rebuilds the matcher, so per-token calls are slow.
    for special, run in groupby([*head, *((t, True) for t in tail)], key=lambda item: item[1]):
        added = [AddedToken(token, special=special, normalized=False) for token, _ in run]
        if special:
            tokenizer.add_special_tokens(added)
        else:
            tokenizer.add_tokens(added)
    vocab_size = text_vocab_size + num_image_codes
    if tokenizer.token_to_id(image_code_token(0)) != text_vocab_size:
        raise AssertionError("tiny tokenizer layout broke: image codes do not start at text_vocab_size")

    _write_tokenizer_files(Path(folder), tokenizer)
    return TinyTokenizerInfo(
        text_vocab_size=text_vocab_size,
        image_token_offset=text_vocab_size,
        num_image_codes=num_image_codes,
        vocab_size=vocab_size,
    )


# Ids of the real checkpoint (MODEL_SPEC §5) and a placeholder home for the grid tokens (their real ids
# are unknown; only their strings are known).
REAL_TEXT_VOCAB_SIZE = 157184
REAL_NUM_IMAGE_CODES = 16384
REAL_SPECIAL_IDS: Mapping[str, int] = {
    EOS_TOKEN: 156892,
    MASK_TOKEN: 156895,
    IMAGE_START_TOKEN: 156901,
    IMAGE_END_TOKEN: 156902,
    BOI_TOKEN: 156904,
}
_REAL_LAYOUT_FIRST_GRID_ID = 156905


def write_real_layout_tokenizer(
    folder: str | Path, *, max_grid: int = 64, moved: Mapping[str, int] | None = None
) -> None:
    """Write a tokenizer whose special tokens sit at the real checkpoint's ids; `moved` overrides some ids.

    The other text ids hold placeholder tokens; bytes come first so that any text still encodes. Image
    code tokens are not written (the config's vocab_size covers them).
    """
    ids = dict(REAL_SPECIAL_IDS)
    ids.update(moved or {})
    grid_ids = {grid_token(n): _REAL_LAYOUT_FIRST_GRID_ID + n for n in range(max_grid + 1)}
    taken = {**ids, **grid_ids}
    if len(set(taken.values())) != len(taken):
        raise ValueError("two special tokens share an id")
    by_id = {i: t for t, i in taken.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for i in range(REAL_TEXT_VOCAB_SIZE):
        if i < len(alphabet):
            vocab[alphabet[i]] = i
        else:
            vocab[by_id.get(i, f"<|placeholder_{i}|>")] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Tokens already in the vocabulary keep their ids when marked special.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in taken])
    _write_tokenizer_files(Path(folder), tokenizer)


def _write_tokenizer_files(folder: Path, tokenizer: Tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special_map = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
