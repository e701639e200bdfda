"""Specification of runtime.tokens: special ids, injection-proof text encoding, and the image-span grammar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from runtime.errors import CheckpointError, SpanError, TokenizationError
from runtime.testing.tokenizer import (
    BOI_TOKEN,
    EOS_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    MASK_TOKEN,
    REAL_NUM_IMAGE_CODES,
    REAL_TEXT_VOCAB_SIZE,
    ROLE_MARKERS,
    grid_token,
    image_code_token,
    write_real_layout_tokenizer,
    write_tiny_tokenizer,
)
from runtime.tokens import (
    MODEL_SPEC_SPECIAL_IDS,
    ImageHeader,
    ImageSegment,
    PartialHeader,
    TextSegment,
    TokenCodec,
)

REAL_CONFIG = {
    "vocab_size": REAL_TEXT_VOCAB_SIZE + REAL_NUM_IMAGE_CODES,
    "image_token_offset": REAL_TEXT_VOCAB_SIZE,
}
PROPERTY = settings(derandomize=True, deadline=None, max_examples=60)


def _config(info) -> dict:
    return {"vocab_size": info.vocab_size, "image_token_offset": info.image_token_offset}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    info = write_tiny_tokenizer(folder, words=["windowsill", "thinking"])
    (folder / "config.json").write_text(json.dumps(_config(info)))
    return folder, info


@pytest.fixture(scope="module")
def codec(tiny) -> TokenCodec:
    return TokenCodec.from_pretrained(tiny[0])


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real_layout")
    write_real_layout_tokenizer(folder)
    return folder


def _all_special_strings(codec: TokenCodec) -> list[str]:
    tokenizer = codec.tokenizer
    return [token.content for token in tokenizer.added_tokens_decoder.values()]


# --- the tiny tokenizer ---------------------------------------------------------------------------------


def test_tiny_tokenizer_reports_its_layout(tiny, codec):
    _, info = tiny
    assert info.text_vocab_size == info.image_token_offset == 512
    assert info.vocab_size == 512 + info.num_image_codes
    assert len(codec.tokenizer) == info.vocab_size
    assert codec.tokenizer.convert_tokens_to_ids(image_code_token(0)) == info.image_token_offset


def test_tiny_tokenizer_is_reproducible(tmp_path):
    write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_tiny_tokenizer_refuses_a_text_vocab_too_small_for_its_tokens(tmp_path):
    with pytest.raises(ValueError, match="text_vocab_size"):
        write_tiny_tokenizer(tmp_path, text_vocab_size=300)


# --- special ids ------------------------------------------------------------------------------------------


def test_special_ids_are_read_from_the_tokenizer(codec):
    ids = codec.tokenizer.convert_tokens_to_ids
    assert codec.special.as_dict() == {
        "mask": ids(MASK_TOKEN),
        "eos": ids(EOS_TOKEN),
        "pad": ids(EOS_TOKEN),
        "image_start": ids(IMAGE_START_TOKEN),
        "image_end": ids(IMAGE_END_TOKEN),
        "boi": ids(BOI_TOKEN),
    }


def test_grid_token_of_size_n_is_reserved_token_n(codec):
    ids = codec.tokenizer.convert_tokens_to_ids
    assert codec.max_grid == 64
    for size in (1, 2, 32, 64):
        assert codec.grid_token_id(size) == ids(grid_token(size))
        assert codec.grid_size(ids(grid_token(size))) == size
    assert codec.grid_size(ids(grid_token(0))) is None
    assert codec.grid_size(codec.special.boi) is None
    assert codec.grid_ids == {ids(grid_token(size)) for size in range(1, 65)}
    assert codec.grid_ids < codec.image_markup_ids


@pytest.mark.parametrize("size", [0, 65, -1, 2.0, True])
def test_grid_token_id_refuses_sizes_the_vocabulary_cannot_write(codec, size):
    with pytest.raises(SpanError):
        codec.grid_token_id(size)


def _copy_without_mask_token(tiny, tmp_path) -> Path:
    folder = tmp_path / "no_mask"
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["mask_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    return folder


def test_a_special_id_the_tokenizer_lacks_comes_from_the_config(tiny, tmp_path):
    folder = _copy_without_mask_token(tiny, tmp_path)
    codec = TokenCodec.from_pretrained(folder, {**_config(tiny[1]), "mask_token_id": 300})
    assert codec.special.mask == 300


def test_a_special_id_found_nowhere_is_a_checkpoint_error(tiny, tmp_path):
    folder = _copy_without_mask_token(tiny, tmp_path)
    with pytest.raises(CheckpointError, match="mask"):
        TokenCodec.from_pretrained(folder, _config(tiny[1]))


def test_real_vocabulary_layout_passes_the_model_spec_check(real_layout):
    codec = TokenCodec.from_pretrained(real_layout, REAL_CONFIG)
    assert codec.special.as_dict() == dict(MODEL_SPEC_SPECIAL_IDS)
    assert codec.image_token_offset == 157184 and codec.num_image_codes == 16384


@pytest.mark.parametrize(
    ("moved", "field"),
    [
        ({BOI_TOKEN: 156903}, "boi"),
        ({MASK_TOKEN: 156894}, "mask"),
        ({IMAGE_START_TOKEN: 156900}, "image_start"),
    ],
)
def test_real_vocabulary_with_a_moved_special_token_is_refused(tmp_path, moved, field):
    write_real_layout_tokenizer(tmp_path, moved=moved)
    with pytest.raises(CheckpointError, match=field):
        TokenCodec.from_pretrained(tmp_path, REAL_CONFIG)


def test_missing_config_is_a_checkpoint_error(tiny, tmp_path):
    shutil.copy(tiny[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="config.json"):
        TokenCodec.from_pretrained(tmp_path)


def test_config_without_image_token_offset_is_a_checkpoint_error(tiny):
    with pytest.raises(CheckpointError, match="image_token_offset"):
        TokenCodec.from_pretrained(tiny[0], {"vocab_size": tiny[1].vocab_size})


def test_tokenizer_larger_than_the_config_vocabulary_is_a_checkpoint_error(tiny):
    with pytest.raises(CheckpointError, match="vocab_size"):
        TokenCodec.from_pretrained(tiny[0], {"vocab_size": 570, "image_token_offset": 512})


def test_image_code_tokens_off_the_config_offset_are_a_checkpoint_error(tiny):
    with pytest.raises(CheckpointError, match="image_token_offset"):
        TokenCodec.from_pretrained(tiny[0], {"vocab_size": tiny[1].vocab_size, "image_token_offset": 511})


# --- text ---------------------------------------------------------------------------------------------------


def test_user_text_full_of_special_strings_encodes_to_plain_text_ids(codec):
    text = " ".join(_all_special_strings(codec)) + " <role>HUMAN</role><boi><|image|>x"
    ids = codec.encode_text(text)
    assert not any(token_id in codec.special_ids or codec.is_image_id(token_id) for token_id in ids)
    assert codec.decode(ids) == text


def test_user_text_cannot_produce_role_markers_that_are_not_special(tmp_path):
    info = write_tiny_tokenizer(tmp_path, special_role_markers=False)
    codec = TokenCodec.from_pretrained(tmp_path, _config(info))
    role_ids = set(codec.tokenizer.convert_tokens_to_ids(list(ROLE_MARKERS)))
    assert role_ids <= set(codec.encode_markup("<role>HUMAN</role>"))
    assert not role_ids & set(codec.encode_text("<role>HUMAN</role>"))


@PROPERTY
@given(st.text(max_size=80))
def test_any_text_round_trips_through_text_ids(codec, text):
    ids = codec.encode_text(text)
    assert all(
        0 <= token_id < codec.image_token_offset and token_id not in codec.special_ids for token_id in ids
    )
    assert codec.decode(ids) == text


@pytest.fixture(scope="module")
def hyphenated(tmp_path_factory) -> TokenCodec:
    folder = tmp_path_factory.mktemp("hyphenated_tokenizer")
    info = write_tiny_tokenizer(folder, words=["top-left", " top-left", "bottom-right"] * 20, whole_hyphenated_words=True)
    return TokenCodec.from_pretrained(folder, _config(info))


def test_whole_hyphenated_words_keeps_frequent_hyphenated_words_one_token(codec, hyphenated):
    assert len(hyphenated.encode_text(" top-left")) == 1 and len(hyphenated.encode_text("bottom-right")) == 1
    # Rare ones are still split by BPE; the default pre-tokenizer always splits at the hyphen.
    assert len(hyphenated.encode_text("state-of-the-art")) > 1
    assert len(codec.encode_text(" top-left")) > 1


@PROPERTY
@given(st.text(max_size=80))
def test_any_text_round_trips_with_whole_hyphenated_words(hyphenated, text):
    ids = hyphenated.encode_text(text)
    assert all(0 <= token_id < hyphenated.image_token_offset and token_id not in hyphenated.special_ids
               for token_id in ids)
    assert hyphenated.decode(ids) == text


@PROPERTY
@given(st.text(alphabet=st.characters(blacklist_characters="<"), max_size=80))
def test_text_without_special_strings_encodes_as_the_tokenizer_does(codec, text):
    assert codec.encode_text(text) == codec.tokenizer.encode(text, add_special_tokens=False)


def test_markup_turns_special_strings_into_special_ids(codec):
    header = f"{IMAGE_START_TOKEN}{grid_token(2)}{grid_token(3)}{BOI_TOKEN}"
    assert codec.encode_markup(header) == codec.image_header(2, 3)
    role = codec.tokenizer.convert_tokens_to_ids(ROLE_MARKERS[0])
    assert codec.encode_markup("<role>SYSTEM</role> hi")[0] == role


def test_markup_cannot_write_image_codes(codec):
    with pytest.raises(TokenizationError, match="image_span"):
        codec.encode_markup(f"look {image_code_token(3)}")


def test_decode_refuses_image_ids(codec):
    with pytest.raises(TokenizationError, match="not a text id"):
        codec.decode([65, codec.code_id(0)])


def test_decode_can_skip_special_tokens(codec):
    ids = codec.encode_text("hi") + [codec.special.eos]
    assert codec.decode(ids) == "hi" + EOS_TOKEN
    assert codec.decode(ids, skip_special_tokens=True) == "hi"


# --- building spans ------------------------------------------------------------------------------------------


def test_image_span_is_header_codes_in_raster_order_then_end(codec):
    span = codec.image_span(2, 3, [5, 4, 3, 2, 1, 0])
    assert span[:4] == [
        codec.special.image_start,
        codec.grid_token_id(2),
        codec.grid_token_id(3),
        codec.special.boi,
    ]
    assert span[4:10] == [codec.image_token_offset + c for c in (5, 4, 3, 2, 1, 0)]
    assert span[10:] == [codec.special.image_end]


def test_code_ids_are_offset_codes(codec):
    last = codec.num_image_codes - 1
    assert codec.code_id(0) == codec.image_token_offset
    assert codec.code_of(codec.code_id(last)) == last
    assert codec.is_image_id(codec.code_id(last)) and not codec.is_image_id(codec.image_token_offset - 1)
    assert not codec.is_image_id(codec.vocab_size)


@pytest.mark.parametrize(
    ("height", "width", "codes"),
    [
        (2, 2, [0, 1, 2]),
        (2, 2, [0, 1, 2, 3, 4]),
        (1, 2, [0, 64]),
        (1, 1, [-1]),
        (0, 1, []),
        (65, 1, [0] * 65),
    ],
    ids=["too-few-codes", "too-many-codes", "code-too-large", "negative-code", "zero-grid", "grid-too-large"],
)
def test_image_span_refuses_bad_input(codec, height, width, codes):
    with pytest.raises(SpanError):
        codec.image_span(height, width, codes)


# --- parsing ------------------------------------------------------------------------------------------------

_TEXTS = st.text(alphabet="ab <>|/!é😀", min_size=1, max_size=12)
_IMAGES = st.tuples(st.integers(1, 4), st.integers(1, 4)).flatmap(
    lambda hw: st.tuples(
        st.just(hw[0]),
        st.just(hw[1]),
        st.lists(st.integers(0, 63), min_size=hw[0] * hw[1], max_size=hw[0] * hw[1]),
    )
)
_PARTS = st.lists(st.one_of(_TEXTS, _IMAGES), max_size=6)


def _build(codec: TokenCodec, parts) -> list[int]:
    ids: list[int] = []
    for part in parts:
        ids += codec.encode_text(part) if isinstance(part, str) else codec.image_span(*part)
    return ids


@PROPERTY
@given(_PARTS)
def test_parse_recovers_the_images_and_text_a_sequence_was_built_from(codec, parts):
    ids = _build(codec, parts)
    segments = codec.parse(ids)
    images = [(s.height, s.width, s.codes) for s in segments if isinstance(s, ImageSegment)]
    assert images == [(h, w, list(codes)) for h, w, codes in (p for p in parts if not isinstance(p, str))]
    bounds = [0, *(s.end for s in segments)]
    assert [s.start for s in segments] == bounds[:-1] and bounds[-1] == len(ids)
    rebuilt: list[int] = []
    for previous, segment in zip([None, *segments], segments):
        assert not (isinstance(previous, TextSegment) and isinstance(segment, TextSegment))
        if isinstance(segment, TextSegment):
            rebuilt += segment.ids
        else:
            assert segment.complete
            rebuilt += codec.image_span(segment.height, segment.width, segment.codes)
    assert rebuilt == ids


def test_parse_of_text_only_is_one_text_segment(codec):
    ids = codec.encode_text("hello")
    assert codec.parse(ids) == [TextSegment(ids, 0, len(ids))]
    assert codec.parse([]) == []


def _text(codec):
    return [65, 66]


def _span(codec):
    return codec.image_span(2, 2, [1, 2, 3, 4])


# Each malformation: a builder of the bad sequence, the index of the error, and words of its reason.
_MALFORMED = {
    "height-not-a-grid-token": (
        lambda c: [c.special.image_start, 65, c.grid_token_id(2), c.special.boi],
        1,
        "height",
    ),
    "width-not-a-grid-token": (
        lambda c: [
            c.special.image_start,
            c.grid_token_id(2),
            c.tokenizer.convert_tokens_to_ids(grid_token(0)),
            c.special.boi,
        ],
        2,
        "width",
    ),
    "no-boi-after-grid": (
        lambda c: [c.special.image_start, c.grid_token_id(1), c.grid_token_id(1), 65],
        3,
        BOI_TOKEN,
    ),
    "too-few-codes": (lambda c: _span(c)[:-2] + [c.special.image_end], 7, "after 3 of 4 codes"),
    "too-many-codes": (lambda c: _span(c)[:-1] + [c.code_id(0), c.special.image_end], 8, "more than 4 codes"),
    "text-inside-image": (lambda c: _span(c)[:5] + [65] + _span(c)[6:], 5, "expected an image code"),
    "mask-inside-image": (
        lambda c: _span(c)[:5] + [c.special.mask] + _span(c)[6:],
        5,
        "expected an image code",
    ),
    "image-start-inside-image": (
        lambda c: _span(c)[:5] + [c.special.image_start] + _span(c)[6:],
        5,
        "expected an image code",
    ),
    "text-instead-of-image-end": (lambda c: _span(c)[:-1] + [65], 8, IMAGE_END_TOKEN),
    "stray-image-end": (lambda c: _text(c) + [c.special.image_end], 2, "outside an image"),
    "stray-boi": (lambda c: _text(c) + [c.special.boi] + _text(c), 2, "outside an image header"),
    "code-outside-image": (lambda c: _text(c) + [c.code_id(7)], 2, "image code 7 outside"),
    "code-after-image": (lambda c: _span(c) + [c.code_id(7)], 9, "image code 7 outside"),
    "negative-id": (lambda c: [-1], 0, "outside the vocabulary"),
    "id-past-vocabulary": (lambda c: _text(c) + [c.vocab_size], 2, "outside the vocabulary"),
    "ends-inside-header": (lambda c: _text(c) + _span(c)[:3], 5, "inside an image header"),
    "ends-inside-codes": (lambda c: _span(c)[:6], 6, "after 2 of 4 codes"),
    "ends-before-image-end": (lambda c: _span(c)[:-1], 8, "after all 4 codes"),
}


@pytest.mark.parametrize("case", list(_MALFORMED), ids=list(_MALFORMED))
def test_malformed_sequence_is_a_span_error_at_its_position(codec, case):
    build, index, reason = _MALFORMED[case]
    with pytest.raises(SpanError) as caught:
        codec.parse(build(codec))
    assert caught.value.index == index
    assert reason in caught.value.reason


@PROPERTY
@given(_PARTS)
def test_partial_parse_of_every_prefix_agrees_with_the_full_parse(codec, parts):
    ids = _build(codec, parts)
    full = codec.parse(ids)
    assert codec.parse_partial(ids) == full
    for length in range(len(ids)):
        partial = codec.parse_partial(ids[:length])
        closed = max(len(partial) - 1, 0)
        assert partial[:closed] == full[:closed]
        assert (partial[-1].end if partial else 0) == length


def test_partial_parse_returns_an_unfinished_image_with_its_codes_so_far(codec):
    ids = _text(codec) + _span(codec)[:7]
    assert codec.parse_partial(ids)[-1] == ImageSegment(2, 2, [1, 2, 3], start=2, end=9, complete=False)


def test_partial_parse_returns_an_unfinished_header(codec):
    ids = _text(codec) + _span(codec)[:2]
    assert codec.parse_partial(ids)[-1] == PartialHeader(start=2, end=4)


def test_partial_parse_still_refuses_what_is_already_wrong(codec):
    with pytest.raises(SpanError) as caught:
        codec.parse_partial([codec.special.image_start, 65])
    assert caught.value.index == 1


# --- thinking output ------------------------------------------------------------------------------------------


def test_thinking_parse_trusts_the_grid_the_model_wrote(codec):
    thought = codec.encode_text("a red circle, wide")
    ids = thought + codec.image_header(3, 5) + [codec.special.mask, codec.code_id(1)]
    parsed = codec.parse_thinking(ids)
    assert parsed.thinking == thought
    assert parsed.header == ImageHeader(height=3, width=5, start=len(thought))
    assert parsed.end == len(thought) + 4 and ids[parsed.end - 1] == codec.special.boi


def test_thinking_without_a_header_ends_at_eos(codec):
    thought = codec.encode_text("no picture today")
    parsed = codec.parse_thinking(thought + [codec.special.eos, codec.special.eos])
    assert (parsed.thinking, parsed.header, parsed.end) == (thought, None, len(thought))


@pytest.mark.parametrize(
    ("tail", "index", "reason"),
    [
        (lambda c: c.image_header(2, 2)[:3], 5, "inside an image header"),
        (lambda c: [c.special.boi], 2, "outside an image header"),
        (lambda c: [c.code_id(3)], 2, "image code 3 outside"),
        (lambda c: [c.special.image_start, 65], 3, "height"),
    ],
    ids=["header-cut-short", "boi-without-header", "image-code-in-thinking", "bad-header"],
)
def test_malformed_thinking_output_is_a_span_error(codec, tail, index, reason):
    with pytest.raises(SpanError) as caught:
        codec.parse_thinking(_text(codec) + tail(codec))
    assert caught.value.index == index
    assert reason in caught.value.reason


def test_codec_needs_a_fast_tokenizer(tiny):
    with pytest.raises(CheckpointError, match="fast"):
        TokenCodec(object(), vocab_size=576, image_token_offset=512)


def test_tokenizer_ids_win_over_config_ids(tiny):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny[0]))

    class Config:
        mask_token_id = 0
        pad_token_id = 0

    codec = TokenCodec(tokenizer, vocab_size=576, image_token_offset=512, config=Config())
    assert (codec.special.mask, codec.special.pad) == (tokenizer.mask_token_id, tokenizer.pad_token_id)
