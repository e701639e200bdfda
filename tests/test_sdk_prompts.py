"""Prompt templates: system prompts, the chat template as exact ids, the checkpoint's template winning."""

import json

import pytest

from llada_agent.prompts import ChatTemplate, ChatTemplateError, chat_ids, render, system_prompt
from runtime import conversation
from runtime.conversation import ASSISTANT, HUMAN, ConversationFormat, ImageCodes, Turn
from runtime.testing.tokenizer import write_tiny_tokenizer
from runtime.tokens import TokenCodec


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    info = write_tiny_tokenizer(root)
    (root / "config.json").write_text(json.dumps({"vocab_size": info.vocab_size,
                                                  "image_token_offset": info.image_token_offset}))
    return root


@pytest.fixture(scope="module")
def codec(root):
    return TokenCodec.from_pretrained(root)


def assemble(pieces, codec, system, turns):
    """A conversation built turn by turn from the pieces, as a session does."""
    fmt = ConversationFormat(codec)
    ids = list(pieces.system_open) + codec.encode_text(system)
    previous = "system"
    for turn in turns:
        if turn.role == HUMAN:
            ids += list(pieces.user_after_system if previous == "system" else pieces.user_after_assistant)
            ids += [t for part in turn.parts for t in fmt.part_ids(part)]
        else:
            ids += [t for part in turn.parts for t in fmt.part_ids(part)] + list(pieces.assistant_close)
        previous = turn.role
        if turn.role == HUMAN:
            ids += list(pieces.assistant_open)
    return ids


def test_system_prompts_are_the_official_strings():
    assert system_prompt("chat") == conversation.UNDERSTANDING_SYSTEM
    assert system_prompt("draw") == conversation.T2I_SYSTEM
    assert system_prompt("think") == conversation.THINKING_SYSTEM
    assert system_prompt("edit") == conversation.EDIT_SYSTEM
    assert system_prompt("story") == conversation.INTERLEAVED_SYSTEM


def test_the_sdk_chat_template_gives_the_ids_of_the_conversation_format(codec):
    pieces, refused = chat_ids(codec)
    assert pieces.source == "sdk" and refused is None
    fmt = ConversationFormat(codec)
    turns = [Turn(HUMAN, (ImageCodes(1, 2, (5, 6)), "what is <boi> this?")), Turn(ASSISTANT, ("a cat",)),
             Turn(HUMAN, ("and now?",))]
    assert assemble(pieces, codec, "be brief", turns) == fmt.prompt("be brief", turns)
    assert list(pieces.assistant_close) == [codec.special.eos]


def test_a_checkpoint_chat_template_wins(root, codec, tmp_path):
    template = ("{% for m in messages %}<role>{{ m.role | upper }}</role>{{ m.content }}"
                "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")
    config = json.loads((root / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    pieces, refused = chat_ids(codec, tmp_path)
    assert pieces.source == "checkpoint" and refused is None
    assert list(pieces.user_after_system) == codec.encode_markup("<role>USER</role>")


def test_a_template_that_is_not_built_turn_by_turn_is_refused_with_a_reason(root, codec, tmp_path):
    # The generation prompt depends on the number of turns: turn-by-turn ids could not extend each other.
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}[reply {{ messages | length }}]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    pieces, refused = chat_ids(codec, tmp_path)
    assert pieces.source == "sdk" and "turn" in refused


def test_a_template_that_drops_content_is_refused():
    template = "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="content"):
        ChatTemplate(template, eos_token="</s>").pieces()


def test_agent_templates_render_their_variables():
    question = render("critic_question.j2", prompt="a red circle", plan="one circle, centred")
    assert "a red circle" in question and "one circle, centred" in question
    assert "too dark" in render("redraw_feedback.j2", feedback="too dark")
