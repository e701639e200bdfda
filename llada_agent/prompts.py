"""The SDK's prompt templates (Jinja2, in `prompts/`) and the chat template turned into exact token ids.

Templates live in the repository's `prompts/` folder, shipped in the wheel as `llada_agent._prompts`.

A chat template renders a whole conversation to one string, but a session needs *ids* that grow turn by
turn, with markup as special tokens and user text never as one. So the template is rendered with
placeholder contents; the text between placeholders is markup (`encode_markup`), the placeholders become
content ids (`encode_text`, image spans). Rendering probe conversations gives the markup that opens and
closes each turn (`ChatPieces`); a longer probe checks that turn-by-turn assembly equals the full
rendering, so a template that is not built turn by turn is refused rather than silently misread. The
checkpoint's own `chat_template` (tokenizer_config.json) wins when it passes that check.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.tokens import TokenCodec

from .errors import InvalidInputError, ModelLoadError

CHAT_TEMPLATE = "chat.j2"
MODES = ("chat", "draw", "think", "edit", "story")


def prompt_files() -> Traversable:
    """The folder of the SDK's templates: the packaged `llada_agent._prompts`, or `prompts/` of a checkout."""
    try:
        return resources.files("llada_agent._prompts")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "prompts"


def _load(name: str) -> str:
    try:
        return prompt_files().joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no prompt template {name!r} in {prompt_files()}") from exc


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment over the SDK's templates (undefined variables are errors)."""
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )


def render(name: str, **variables: Any) -> str:
    """The template `name` (e.g. "critic_question.j2") rendered with `variables`."""
    try:
        return environment().get_template(name).render(**variables)
    except jinja2.UndefinedError as exc:
        raise InvalidInputError(f"template {name!r}: {exc}") from exc


def system_prompt(mode: str) -> str:
    """The system prompt of a session mode ("chat", "draw", "think", "edit", "story"; MODEL_SPEC §5)."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return render(f"system_{mode}.j2")


# ---------------------------------------------------------------------------------------------------------
# Chat templates as token pieces


class ChatTemplateError(ModelLoadError):
    """A chat template cannot be rendered, or does not build a conversation turn by turn."""


@dataclass(frozen=True)
class ChatPieces:
    """The markup around turns, as strings: a conversation is
    `system_open S user_after_system U assistant_open A assistant_close user_after_assistant U ...`."""

    system_open: str
    user_after_system: str
    assistant_open: str
    assistant_close: str
    user_after_assistant: str


@dataclass(frozen=True)
class ChatIds:
    """`ChatPieces` as token ids of one checkpoint (markup encoded with `encode_markup`)."""

    system_open: tuple[int, ...]
    user_after_system: tuple[int, ...]
    assistant_open: tuple[int, ...]
    assistant_close: tuple[int, ...]
    user_after_assistant: tuple[int, ...]
    source: str  # "checkpoint" or "sdk": whose template this is


_SENTINEL = "@@LLADA_CONTENT_{}@@"
_SENTINEL_RE = re.compile(r"@@LLADA_CONTENT_(\d+)@@")


class ChatTemplate:
    """A Jinja chat template over messages {role, content} (roles system / user / assistant)."""

    def __init__(self, source: str, *, eos_token: str, bos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc
        self.eos_token = eos_token
        self.bos_token = bos_token

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The conversation as one string."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         eos_token=self.eos_token, bos_token=self.bos_token)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc

    def pieces(self) -> ChatPieces:
        """The markup around each turn, read off probe renderings and checked against a longer one."""
        roles = ["system", "user", "assistant", "user"]
        open_text = self._split(roles, add_generation_prompt=True)
        closed_text = self._split([*roles, "assistant"], add_generation_prompt=False)
        system_open, user_after_system, assistant_open, between, generation = open_text
        close = closed_text[-1]
        if generation != assistant_open or not between.startswith(close):
            raise ChatTemplateError(
                "the chat template does not build turns independently (the assistant opening or closing "
                "markup changes with the turn's place in the conversation)"
            )
        pieces = ChatPieces(system_open, user_after_system, assistant_open, close, between[len(close):])
        roles = ["system", "user", "assistant", "user", "assistant", "user"]
        contents = [_SENTINEL.format(i) for i in range(len(roles))]
        whole = self.render([{"role": r, "content": c} for r, c in zip(roles, contents)],
                            add_generation_prompt=True)
        assembled = (pieces.system_open + contents[0] + pieces.user_after_system + contents[1]
                     + pieces.assistant_open + contents[2] + pieces.assistant_close + pieces.user_after_assistant
                     + contents[3] + pieces.assistant_open + contents[4] + pieces.assistant_close
                     + pieces.user_after_assistant + contents[5] + pieces.assistant_open)
        if whole != assembled:
            raise ChatTemplateError("the chat template's rendering of three rounds is not the sum of its turns")
        return pieces

    def _split(self, roles: list[str], *, add_generation_prompt: bool) -> list[str]:
        messages = [{"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(roles)]
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        found = [int(m.group(1)) for m in _SENTINEL_RE.finditer(text)]
        if found != list(range(len(roles))):
            raise ChatTemplateError(
                "the chat template does not place each message's content once, in order "
                f"(placeholders found in order {found})"
            )
        return _SENTINEL_RE.split(text)[::2]

    def compile(self, codec: TokenCodec, *, source: str) -> ChatIds:
        """The pieces as ids of `codec`'s checkpoint."""
        pieces = self.pieces()

        def ids(text: str) -> tuple[int, ...]:
            # The end-of-text token is the id generation stops at, whatever its string tokenises to.
            if text == self.eos_token:
                return (codec.special.eos,)
            return tuple(codec.encode_markup(text))

        return ChatIds(
            system_open=ids(pieces.system_open),
            user_after_system=ids(pieces.user_after_system),
            assistant_open=ids(pieces.assistant_open),
            assistant_close=ids(pieces.assistant_close),
            user_after_assistant=ids(pieces.user_after_assistant),
            source=source,
        )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def sdk_chat_template(eos_token: str) -> ChatTemplate:
    """The SDK's own chat template (`prompts/chat.j2`)."""
    return ChatTemplate(_load(CHAT_TEMPLATE), eos_token=eos_token)


def checkpoint_chat_template(root: str | Path) -> str | None:
    """The `chat_template` of a checkpoint's tokenizer_config.json (or chat_template.jinja), if any."""
    root = Path(root)
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def chat_ids(codec: TokenCodec, root: str | Path | None = None) -> tuple[ChatIds, str | None]:
    """The chat pieces for a checkpoint: its own template when it has a usable one, else the SDK's.

    Returns the pieces and, when the checkpoint's template was refused, why (for a warning)."""
    tokenizer = codec.tokenizer
    eos_token = tokenizer.convert_ids_to_tokens(codec.special.eos)
    bos_token = getattr(tokenizer, "bos_token", None) or ""
    refused = None
    source = checkpoint_chat_template(root) if root is not None else None
    if source is not None:
        try:
            return ChatTemplate(source, eos_token=eos_token, bos_token=bos_token).compile(codec, source="checkpoint"), None
        except ModelLoadError as exc:
            refused = f"the checkpoint's chat template was not used: {exc}"
        except Exception as exc:  # noqa: BLE001 - a template may fail in ways of its own (bad markup for this tokenizer)
            refused = f"the checkpoint's chat template was not used: {type(exc).__name__}: {exc}"
    return sdk_chat_template(eos_token).compile(codec, source="sdk"), refused
