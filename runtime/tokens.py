"""Token ids of LLaDA2.0-Uni: the special-id map, text encoding that user text cannot escape, and the
image-span grammar (build spans from codes; parse text and image spans out of ids).

Facts behind this module (read in public sources, not checked against the real tokenizer files):

- `<|image|>`, `<|/image|>`, `<boi>` are the strings of ids 156901, 156902, 156904: SGLang-Omni
  `sglang_omni/models/llada2_uni/components/preprocessor.py` (constants SOI/EOI/BOI with those ids).
- A grid size s is written as the token `<|reserved_token_{s}|>`: the size itself, no offset. The same
  preprocessor formats `<|reserved_token_{h}|>` from the image processor's grid height (and width), and
  `sglang_omni/models/llada2_uni/interleaved.py` reads the size back from the token's string. The ids of
  these tokens are not published; they are looked up in the tokenizer.
- The checkpoint's tokenizer defines `mask_token_id` 156895: SGLang-Omni's test double of it (class
  FakeTokenizer in its llada2_uni image-decoder tests). Third-party LLaDA2.0-mini adapters (same text
  tokenizer family) name id 156895 `<|mask|>` and say `mask_token_id` is absent from config.json; EOS
  156892 is the `eos_id` default of the Hub `generate()` and the config's pad_token_id. The EOS string
  (`<|endoftext|>` in the Ling family) was not confirmed. Both ids are read from the tokenizer
  (`mask_token`, `eos_token`), then the backbone config, then (real vocabulary only) MODEL_SPEC §5.
- Role markers: SGLang-Omni writes `<role>HUMAN</role>` etc. as plain text and lets the checkpoint's
  tokenizer split it; whether `<role>` is one added token is unknown. This module works either way: user
  text can never produce an added token, special or not.
- The checkpoint's tokenizer seems to hold one token per image code (SGLang-Omni calls id 157184
  `<IMAGE0>`; its fake tokenizer has length 157184 + 16384). So plain `tokenizer.encode` could turn typed
  text into image ids; `TokenCodec.encode_text` cannot.
- The CFG null prompt `<uncondition>` may be one token of the real vocabulary (SGLang-Omni's test double
  looks it up with `convert_tokens_to_ids`). The official code runs whole prompts, `<uncondition>`
  included, through `tokenizer.encode`, so templates go through `encode_markup`, which does the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, cast

from .errors import CheckpointError, SpanError, TokenizationError

IMAGE_START = "<|image|>"
IMAGE_END = "<|/image|>"
BOI = "<boi>"
GRID_TOKEN_FORMAT = "<|reserved_token_{}|>"
IMAGE_CODE_TOKEN_FORMAT = "<IMAGE{}>"
HEADER_LENGTH = 4

# MODEL_SPEC §2 and §5: the real checkpoint's vocabulary and special ids, used as a check.
MODEL_SPEC_VOCAB_SIZE = 173568
MODEL_SPEC_IMAGE_TOKEN_OFFSET = 157184
MODEL_SPEC_SPECIAL_IDS: Mapping[str, int] = {
    "mask": 156895,
    "eos": 156892,
    "pad": 156892,
    "image_start": 156901,
    "image_end": 156902,
    "boi": 156904,
}

# Grid tokens are probed 1, 2, 3, ... until one is missing; no image grid is anywhere near this.
_GRID_PROBE_LIMIT = 4096


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens with a role in the format: mask, end of text, padding, image markers."""

    mask: int
    eos: int
    pad: int
    image_start: int
    image_end: int
    boi: int

    def as_dict(self) -> dict[str, int]:
        """Return {field name: id}."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TextSegment:
    """A run of text ids, `ids == sequence[start:end]`."""

    ids: list[int]
    start: int
    end: int


@dataclass(frozen=True)
class ImageSegment:
    """One image span: grid size, raw codes (0..num_codes-1) in raster order, and `sequence[start:end]`.

    `complete` is False only from `parse_partial`: the span is still being generated and `codes` holds
    the codes so far (`end` is then the sequence length).
    """

    height: int
    width: int
    codes: list[int]
    start: int
    end: int
    complete: bool = True

    @property
    def num_codes(self) -> int:
        """Return how many codes the finished image has (height * width)."""
        return self.height * self.width


@dataclass(frozen=True)
class PartialHeader:
    """The first 1-3 ids of an image header at the end of a partial sequence: `sequence[start:end]`."""

    start: int
    end: int


@dataclass(frozen=True)
class ImageHeader:
    """A complete header `<|image|> <grid h> <grid w> <boi>` at `sequence[start:start + 4]`."""

    height: int
    width: int
    start: int

    @property
    def end(self) -> int:
        """Return the index just past `<boi>`."""
        return self.start + HEADER_LENGTH


@dataclass(frozen=True)
class ThinkingParse:
    """The output of a thinking phase: the thinking text and the header of the image the model chose.

    `ids[:end]` is what the drawing phase continues from: through `<boi>` when there is a header; up to
    the first EOS (or the end) when the model wrote none.
    """

    thinking: list[int]
    header: ImageHeader | None
    end: int


Segment = TextSegment | ImageSegment
PartialSegment = TextSegment | ImageSegment | PartialHeader


def _span_error(index: int, reason: str) -> SpanError:
    error = SpanError(f"invalid token sequence at position {index}: {reason}")
    # Callers (and tests) act on where and why without parsing the message.
    error.index = index  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[attr-defined]
    return error


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        value = config.get(key)
    else:
        value = getattr(config, key, None)
    # transformers allows a list of eos ids; the first is the canonical one.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    """Return the id of `token` when the tokenizer has exactly that token (not its unknown token)."""
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
        return token_id
    return None


def read_special_tokens(
    tokenizer: Any, config: Any = None, *, check_model_spec: bool = False
) -> SpecialTokens:
    """Return the special ids: from the tokenizer, else from the backbone config (`mask_token_id`, ...).

    With `check_model_spec` (the real vocabulary), ids are also taken from MODEL_SPEC §5 when neither
    source has them, and any id that differs from MODEL_SPEC raises `CheckpointError`.
    """
    fallback = MODEL_SPEC_SPECIAL_IDS if check_model_spec else {}
    found: dict[str, int | None] = {}
    for name, attribute in (("mask", "mask_token"), ("eos", "eos_token"), ("pad", "pad_token")):
        token_id = _token_id(tokenizer, getattr(tokenizer, attribute, None))
        if token_id is None:
            token_id = _config_value(config, f"{name}_token_id")
        found[name] = token_id if token_id is not None else fallback.get(name)
    if found["pad"] is None:
        found["pad"] = found["eos"]
    for name, token in (("image_start", IMAGE_START), ("image_end", IMAGE_END), ("boi", BOI)):
        found[name] = _token_id(tokenizer, token)
    missing = [name for name, token_id in found.items() if token_id is None]
    if missing:
        raise CheckpointError(
            f"the tokenizer and config do not define these special tokens: {', '.join(missing)} "
            f"(image markers must be the tokens {IMAGE_START!r}, {IMAGE_END!r}, {BOI!r})"
        )
    special = SpecialTokens(**{name: int(token_id) for name, token_id in found.items()})  # type: ignore[arg-type]
    distinct = [special.mask, special.eos, special.image_start, special.image_end, special.boi]
    if len(set(distinct)) != len(distinct):
        raise CheckpointError(f"special tokens share ids: {special.as_dict()}")
    if check_model_spec:
        wrong = {
            name: (token_id, MODEL_SPEC_SPECIAL_IDS[name])
            for name, token_id in special.as_dict().items()
            if token_id != MODEL_SPEC_SPECIAL_IDS[name]
        }
        if wrong:
            detail = ", ".join(f"{name} is {got}, expected {want}" for name, (got, want) in wrong.items())
            raise CheckpointError(f"tokenizer does not match the LLaDA2.0-Uni vocabulary: {detail}")
    return special


class TokenCodec:
    """Text and image spans <-> token ids for one checkpoint: its fast tokenizer plus its config's layout.

    Ids below `image_token_offset` are text; id `image_token_offset + c` is image code c, for c below
    `num_image_codes`. User text goes through `encode_text`, our own templates through `encode_markup`.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, image_token_offset: int, config: Any = None):
        if not hasattr(tokenizer, "backend_tokenizer"):
            raise CheckpointError(
                f"a fast (tokenizers-backed) tokenizer is required, got {type(tokenizer).__name__}"
            )
        if not 0 < image_token_offset < vocab_size:
            raise CheckpointError(
                f"image_token_offset {image_token_offset} must lie inside vocab_size {vocab_size}"
            )
        if len(tokenizer) > vocab_size:
            raise CheckpointError(
                f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}"
            )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.image_token_offset = image_token_offset
        self.num_image_codes = vocab_size - image_token_offset
        real = (vocab_size, image_token_offset) == (MODEL_SPEC_VOCAB_SIZE, MODEL_SPEC_IMAGE_TOKEN_OFFSET)
        self.special = read_special_tokens(tokenizer, config, check_model_spec=real)

        self._grid_ids: list[int] = []
        for size in range(1, _GRID_PROBE_LIMIT + 1):
            token_id = _token_id(tokenizer, GRID_TOKEN_FORMAT.format(size))
            if token_id is None:
                break
            self._grid_ids.append(token_id)
        if not self._grid_ids:
            raise CheckpointError(f"the tokenizer has no grid token {GRID_TOKEN_FORMAT.format(1)}")
        self._grid_size_by_id = {token_id: size for size, token_id in enumerate(self._grid_ids, start=1)}

        first_code = _token_id(tokenizer, IMAGE_CODE_TOKEN_FORMAT.format(0))
        if first_code is not None and first_code != image_token_offset:
            raise CheckpointError(
                f"the tokenizer puts {IMAGE_CODE_TOKEN_FORMAT.format(0)} at id {first_code}, "
                f"but the config's image_token_offset is {image_token_offset}"
            )
        format_ids = [*self.special.as_dict().values(), *self._grid_ids]
        if any(token_id >= image_token_offset for token_id in format_ids):
            raise CheckpointError("a special or grid token id lies in the image-code range")
        # Every added token (special or not) and every special id: user text may produce none of them.
        self.special_ids = frozenset(
            [*tokenizer.added_tokens_decoder, *tokenizer.all_special_ids, *format_ids]
        )
        self._backend = tokenizer.backend_tokenizer

    @classmethod
    def from_pretrained(cls, root: str | Path, config: Any = None) -> TokenCodec:
        """Return the codec of a checkpoint folder; `config` (mapping or config object) defaults to config.json.

        Loads the folder's tokenizer.json as a transformers fast tokenizer; never runs remote code.
        """
        from transformers import PreTrainedTokenizerFast

        root = Path(root)
        if not (root / "tokenizer.json").is_file():
            raise CheckpointError(f"{root}: no tokenizer.json (a fast tokenizer is required)")
        if config is None:
            config_path = root / "config.json"
            if not config_path.is_file():
                raise CheckpointError(f"{root}: no config.json; pass the backbone config as config=")
            config = json.loads(config_path.read_text())
        sizes = {key: _config_value(config, key) for key in ("vocab_size", "image_token_offset")}
        bad = [key for key, value in sizes.items() if not isinstance(value, int) or isinstance(value, bool)]
        if bad:
            raise CheckpointError(f"the backbone config lacks integer {', '.join(bad)}")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root))
        return cls(
            tokenizer,
            vocab_size=sizes["vocab_size"],
            image_token_offset=sizes["image_token_offset"],
            config=config,
        )

    # --- text ---------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Return the ids of user text, in which every special string (`<boi>`, `<role>`, ...) is plain text.

        Runs the tokenizer's own normalizer, pre-tokenizer and model but not its added-token matching, so
        no typed string can become an added, special or image token; the result is checked all the same.
        """
        if not isinstance(text, str):
            raise TokenizationError(f"text must be a str, got {type(text).__name__}")
        backend = self._backend
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        if backend.pre_tokenizer is not None:
            pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        else:
            pieces = [normalized] if normalized else []
        ids = [token.id for piece in pieces for token in backend.model.tokenize(piece)]
        for index, token_id in enumerate(ids):
            if token_id in self.special_ids or not 0 <= token_id < self.image_token_offset:
                raise TokenizationError(
                    f"the tokenizer turned user text into the reserved id {token_id} "
                    f"({self.describe(token_id)}) at token {index}; refusing it"
                )
        return ids

    def encode_markup(self, text: str) -> list[int]:
        """Return the ids of one of our own templates, where special strings ARE special tokens.

        Never for user text. Image codes cannot be written as markup: build them with `image_span`.
        """
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < self.image_token_offset:
                raise TokenizationError(
                    f"markup produced the non-text id {token_id} at token {index}; use image_span for images"
                )
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Return the text of text ids (special tokens as their strings unless skipped)."""
        ids = [int(token_id) for token_id in ids]
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < self.image_token_offset:
                raise TokenizationError(f"id {token_id} at position {index} is not a text id")
        return self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def describe(self, token_id: int) -> str:
        """Return a short human-readable name of an id, for error messages."""
        if self.is_image_id(token_id):
            return f"image code {token_id - self.image_token_offset}"
        if 0 <= token_id < self.image_token_offset:
            return repr(self.tokenizer.convert_ids_to_tokens(token_id))
        return "outside the vocabulary"

    # --- image ids ----------------------------------------------------------------------------------

    @property
    def max_grid(self) -> int:
        """Return the largest grid height/width the vocabulary can write (grid tokens 1..max_grid exist)."""
        return len(self._grid_ids)

    def grid_token_id(self, size: int) -> int:
        """Return the id of the token that writes grid height/width `size` (1..max_grid)."""
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.max_grid:
            raise SpanError(f"grid size must be an int in 1..{self.max_grid}, got {size!r}")
        return self._grid_ids[size - 1]

    @cached_property
    def grid_ids(self) -> frozenset[int]:
        """The ids of the grid tokens (sizes 1..max_grid): what a header may hold between `<|image|>` and `<boi>`."""
        return frozenset(self._grid_ids)

    @cached_property
    def image_markup_ids(self) -> frozenset[int]:
        """The ids that only an image span holds besides its codes: its markers and the grid tokens."""
        special = self.special
        return frozenset({special.image_start, special.boi, special.image_end}) | self.grid_ids

    def grid_size(self, token_id: int) -> int | None:
        """Return the grid size a token writes, or None when the id is not a grid token."""
        return self._grid_size_by_id.get(token_id)

    def is_image_id(self, token_id: int) -> bool:
        """Return whether an id is an image code."""
        return self.image_token_offset <= token_id < self.vocab_size

    def code_id(self, code: int) -> int:
        """Return the id of image code `code` (0..num_image_codes-1)."""
        if isinstance(code, bool) or not 0 <= code < self.num_image_codes:
            raise SpanError(f"image code must be in 0..{self.num_image_codes - 1}, got {code!r}")
        return self.image_token_offset + int(code)

    def code_of(self, token_id: int) -> int:
        """Return the image code of an image id."""
        if not self.is_image_id(token_id):
            raise SpanError(f"id {token_id} is not an image code ({self.describe(token_id)})")
        return token_id - self.image_token_offset

    def image_header(self, height: int, width: int) -> list[int]:
        """Return `<|image|> <grid height> <grid width> <boi>`: the ids that open an image of that grid."""
        return [
            self.special.image_start,
            self.grid_token_id(height),
            self.grid_token_id(width),
            self.special.boi,
        ]

    def image_span(self, height: int, width: int, codes: Sequence[int]) -> list[int]:
        """Return a whole image span: header, height*width code ids in raster order, `<|/image|>`."""
        header = self.image_header(height, width)
        codes = [int(code) for code in codes]
        if len(codes) != height * width:
            raise SpanError(f"a {height}x{width} image needs {height * width} codes, got {len(codes)}")
        return [*header, *(self.code_id(code) for code in codes), self.special.image_end]

    # --- parsing ------------------------------------------------------------------------------------

    def parse(self, ids: Sequence[int]) -> list[Segment]:
        """Return the text and image segments of a complete sequence, in order.

        Raises `SpanError` (with `.index` and `.reason`; index == len(ids) when the sequence ends too
        early) for a bad header, a code count other than height*width, a non-code inside an image, a
        stray `<|/image|>` or `<boi>`, an image code outside an image, or an id outside the vocabulary.
        """
        return self._scan(ids, partial=False)  # type: ignore[return-value]

    def parse_partial(self, ids: Sequence[int]) -> list[PartialSegment]:
        """Return the segments of a sequence still being generated: like `parse`, but the end may be open.

        An unfinished image at the end comes back as `ImageSegment(complete=False)` with its codes so
        far; an unfinished header as `PartialHeader`. Anything already wrong raises `SpanError`.
        """
        return self._scan(ids, partial=True)

    def parse_thinking(self, ids: Sequence[int]) -> ThinkingParse:
        """Return the thinking text and the image header written by a thinking phase's output ids.

        The text runs up to the first `<|image|>` (or the first EOS, then without image). The header the
        model wrote decides the grid, whatever size was asked for. Ids past `<boi>` are ignored.
        """
        ids = [int(token_id) for token_id in ids]
        stop = ids.index(self.special.eos) if self.special.eos in ids else len(ids)
        for index in range(stop):
            token_id = ids[index]
            if token_id == self.special.image_start:
                header = cast(ImageHeader, self._read_header(ids, index, partial=False))
                return ThinkingParse(thinking=ids[:index], header=header, end=header.end)
            self._check_text_id(ids, index)
        return ThinkingParse(thinking=ids[:stop], header=None, end=stop)

    def _check_text_id(self, ids: list[int], index: int) -> None:
        token_id = ids[index]
        if not 0 <= token_id < self.vocab_size:
            raise _span_error(index, f"id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        if token_id == self.special.image_end:
            raise _span_error(index, f"{IMAGE_END} outside an image")
        if token_id == self.special.boi:
            raise _span_error(index, f"{BOI} outside an image header")
        if self.is_image_id(token_id):
            raise _span_error(index, f"image code {token_id - self.image_token_offset} outside an image")

    def _scan(self, ids: Sequence[int], *, partial: bool) -> list[PartialSegment]:
        ids = [int(token_id) for token_id in ids]
        segments: list[PartialSegment] = []
        text_start = 0
        index = 0
        while index < len(ids):
            if ids[index] != self.special.image_start:
                self._check_text_id(ids, index)
                index += 1
                continue
            if index > text_start:
                segments.append(TextSegment(ids[text_start:index], text_start, index))
            image = self._read_image(ids, index, partial=partial)
            segments.append(image)
            index = text_start = image.end
        if len(ids) > text_start:
            segments.append(TextSegment(ids[text_start:], text_start, len(ids)))
        return segments

    def _read_header(self, ids: list[int], start: int, *, partial: bool) -> ImageHeader | PartialHeader:
        end = min(start + HEADER_LENGTH, len(ids))
        sizes = []
        for index in range(start + 1, end):
            token_id = ids[index]
            if index < start + 3:
                size = self.grid_size(token_id)
                if size is None:
                    role = "height" if index == start + 1 else "width"
                    raise _span_error(
                        index, f"expected a grid {role} token, got id {token_id} ({self.describe(token_id)})"
                    )
                sizes.append(size)
            elif token_id != self.special.boi:
                raise _span_error(
                    index,
                    f"expected {BOI} after the grid tokens, got id {token_id} ({self.describe(token_id)})",
                )
        if end - start < HEADER_LENGTH:
            if partial:
                return PartialHeader(start, end)
            raise _span_error(len(ids), "the sequence ends inside an image header")
        return ImageHeader(height=sizes[0], width=sizes[1], start=start)

    def _read_image(self, ids: list[int], start: int, *, partial: bool) -> ImageSegment | PartialHeader:
        header = self._read_header(ids, start, partial=partial)
        if isinstance(header, PartialHeader):
            return header
        count = header.height * header.width
        grid = f"{header.height}x{header.width}"
        codes: list[int] = []
        index = header.end
        while index < len(ids) and len(codes) < count:
            token_id = ids[index]
            if not self.is_image_id(token_id):
                if token_id == self.special.image_end:
                    raise _span_error(index, f"image ends after {len(codes)} of {count} codes ({grid})")
                raise _span_error(
                    index, f"expected an image code, got id {token_id} ({self.describe(token_id)})"
                )
            codes.append(token_id - self.image_token_offset)
            index += 1
        if index == len(ids):
            if partial:
                return ImageSegment(header.height, header.width, codes, start, index, complete=False)
            missing = f"{len(codes)} of {count} codes" if len(codes) < count else f"all {count} codes"
            raise _span_error(index, f"the sequence ends inside an image ({grid}) after {missing}")
        token_id = ids[index]
        if token_id != self.special.image_end:
            if self.is_image_id(token_id):
                raise _span_error(index, f"image has more than {count} codes ({grid})")
            raise _span_error(
                index,
                f"expected {IMAGE_END} after {count} codes, got id {token_id} ({self.describe(token_id)})",
            )
        return ImageSegment(header.height, header.width, codes, start, index + 1)
