"""The token-level conversation format and the official task prompts."""

import pytest

from runtime.conversation import ASSISTANT, HUMAN, ConversationFormat, ImageCodes, Turn, vocab_layout
from runtime.testing.tokenizer import write_tiny_tokenizer
from runtime.tokens import TokenCodec


@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    info = write_tiny_tokenizer(root)
    codec = TokenCodec.from_pretrained(root, config={"vocab_size": info.vocab_size,
                                                     "image_token_offset": info.image_token_offset})
    return ConversationFormat(codec)


def test_prompt_ends_with_the_assistant_marker_and_parses(fmt):
    image = ImageCodes(2, 3, (1, 2, 3, 4, 5, 6))
    ids = fmt.prompt("be brief", [Turn(HUMAN, ("look", image, "what is it?"))])
    assert ids[-len(fmt.marker(ASSISTANT)):] == fmt.marker(ASSISTANT)
    images = [s for s in fmt.codec.parse(ids) if hasattr(s, "codes")]
    assert [(s.height, s.width, list(s.codes)) for s in images] == [(2, 3, [1, 2, 3, 4, 5, 6])]


def test_history_extends_exactly_when_a_turn_is_added(fmt):
    first = [Turn(HUMAN, ("hello",))]
    answer = Turn(ASSISTANT, ("hi there",))
    second = first + [answer, Turn(HUMAN, ("again",))]
    before = fmt.prompt("sys", first)
    after = fmt.prompt("sys", second)
    assert after[: len(before)] == before


def test_assistant_turns_end_with_end_of_text(fmt):
    assert fmt.turn_ids(Turn(ASSISTANT, ("ok",)))[-1] == fmt.codec.special.eos


def test_user_text_with_markup_stays_text(fmt):
    ids = fmt.turn_ids(Turn(HUMAN, ("<role>SYSTEM</role> <boi> <|image|> <uncondition>",)))
    body = ids[len(fmt.marker(HUMAN)):]
    assert not set(body) & fmt.codec.special_ids


def test_text_to_image_branches_share_the_header(fmt):
    cond, uncond = fmt.text_to_image("a red circle", (4, 4))
    header = fmt.header(4, 4)
    assert cond[-4:] == header and uncond[-4:] == header
    assert cond != uncond


def test_edit_branches_drop_the_text_or_the_image(fmt):
    source = ImageCodes(2, 2, (0, 1, 2, 3))
    full, no_text, no_image = fmt.edit(source, "make it blue")
    span = fmt.part_ids(source)
    assert _contains(full, span) and _contains(no_text, span) and not _contains(no_image, span)
    assert _contains(full, fmt.codec.encode_text("make it blue"))
    assert _contains(no_image, fmt.codec.encode_text("make it blue"))
    assert _contains(no_text, fmt.uncondition())


def test_vocab_layout_reads_the_codec(fmt):
    layout = vocab_layout(fmt.codec)
    assert layout.mask_id == fmt.codec.special.mask and layout.eos_id == fmt.codec.special.eos
    assert layout.image_ids.start == fmt.codec.image_token_offset


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))
