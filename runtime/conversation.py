"""The conversation format at the token level: role markers, turns, and the prompts of the official tasks.

LLaDA2.0-Uni reads `<role>SYSTEM</role>{system}<role>HUMAN</role>{user}<role>ASSISTANT</role>{answer}`
(MODEL_SPEC §5). Turns are built from parts — text, or an image span — and every piece of user text goes
through `TokenCodec.encode_text`, so nothing a user types can become a special or image id. Role markers
and the `<uncondition>` null prompt are our own markup (`encode_markup`). An assistant turn in history ends
with end-of-text, as generation does.

Task prompts (each returns the conditional ids plus the guidance branches the task uses):
text-to-image (simple CFG), thinking text-to-image (text first, then the image), understanding, editing
(three-branch CFG) and interleaved writing. Branch prompts end with the image header, so the generated
codes follow directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.generate import VocabLayout
from runtime.tokens import TokenCodec

SYSTEM, HUMAN, ASSISTANT = "SYSTEM", "HUMAN", "ASSISTANT"
ROLE_MARKER = "<role>{}</role>"
UNCONDITION = "<uncondition>"

# The system prompts the checkpoint was trained with (MODEL_SPEC §5).
T2I_SYSTEM = "You are a text-to-image generation assistant."
THINKING_SYSTEM = "You are a text-to-image generation assistant with a thinking process."
UNDERSTANDING_SYSTEM = "You are a multimodal understanding assistant."
EDIT_SYSTEM = "You are an image editing assistant."
INTERLEAVED_SYSTEM = "You are an interleaved text and image assistant."


@dataclass(frozen=True)
class ImageCodes:
    """An image as the model sees it: a grid of h x w codes in raster order."""

    height: int
    width: int
    codes: tuple[int, ...]


Part = str | ImageCodes


@dataclass(frozen=True)
class Turn:
    role: str  # SYSTEM, HUMAN or ASSISTANT
    parts: tuple[Part, ...]


def vocab_layout(codec: TokenCodec) -> VocabLayout:
    """The ids generation needs, read from a checkpoint's codec."""
    return VocabLayout(
        mask_id=codec.special.mask,
        eos_id=codec.special.eos,
        image_offset=codec.image_token_offset,
        num_image_codes=codec.num_image_codes,
        vocab_size=codec.vocab_size,
    )


class ConversationFormat:
    """Builds token ids of conversations and task prompts for one checkpoint."""

    def __init__(self, codec: TokenCodec):
        self.codec = codec
        self._markers = {role: codec.encode_markup(ROLE_MARKER.format(role)) for role in (SYSTEM, HUMAN, ASSISTANT)}
        self._uncondition = codec.encode_markup(UNCONDITION)

    # ----- pieces

    def marker(self, role: str) -> list[int]:
        return list(self._markers[role])

    def part_ids(self, part: Part) -> list[int]:
        if isinstance(part, ImageCodes):
            return self.codec.image_span(part.height, part.width, part.codes)
        return self.codec.encode_text(part)

    def turn_ids(self, turn: Turn) -> list[int]:
        """A turn's ids; an assistant turn ends with end-of-text."""
        ids = self.marker(turn.role)
        for part in turn.parts:
            ids += self.part_ids(part)
        if turn.role == ASSISTANT:
            ids.append(self.codec.special.eos)
        return ids

    def prompt(self, system: str | None, turns: Sequence[Turn]) -> list[int]:
        """System + turns + the opening assistant marker: what generation continues from."""
        ids = self.turn_ids(Turn(SYSTEM, (system,))) if system is not None else []
        for turn in turns:
            ids += self.turn_ids(turn)
        return ids + self.marker(ASSISTANT)

    def header(self, height: int, width: int) -> list[int]:
        return self.codec.image_header(height, width)

    def uncondition(self) -> list[int]:
        return list(self._uncondition)

    # ----- the official tasks

    def text_to_image(self, prompt: str, grid: tuple[int, int], system: str = T2I_SYSTEM) -> list[list[int]]:
        """[conditional, unconditional] branches for text-to-image."""
        header = self.header(*grid)
        cond = self.prompt(system, [Turn(HUMAN, (prompt,))]) + header
        uncond = self._null_prompt(system) + header
        return [cond, uncond]

    def unconditional(self, system: str, grid: tuple[int, int]) -> list[int]:
        """The null-prompt branch for a given system prompt and grid."""
        return self._null_prompt(system) + self.header(*grid)

    def _null_prompt(self, system: str) -> list[int]:
        return (self.marker(SYSTEM) + self.codec.encode_text(system) + self.marker(HUMAN) + self.uncondition()
                + self.marker(ASSISTANT))

    def edit(self, source: ImageCodes, instruction: str, system: str = EDIT_SYSTEM,
             grid: tuple[int, int] | None = None) -> list[list[int]]:
        """[full, no-text, no-image] branches for editing; the output grid defaults to the source's."""
        header = self.header(*(grid or (source.height, source.width)))
        head = self.marker(SYSTEM) + self.codec.encode_text(system) + self.marker(HUMAN)
        span = self.part_ids(source)
        tail = self.marker(ASSISTANT) + header
        full = head + span + self.codec.encode_text(instruction) + tail
        no_text = head + span + self.uncondition() + tail
        no_image = head + [self.codec.special.image_start] + self.codec.encode_text(instruction) + tail
        return [full, no_text, no_image]
