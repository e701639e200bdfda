"""Typed errors raised by the engine. Each says what went wrong and, where it can, what to do."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Root of every error the engine raises on purpose."""


class CheckpointError(RuntimeErrorBase):
    """A checkpoint folder is missing, incomplete, or does not match its config."""


class MissingTensorsError(CheckpointError):
    """A checkpoint lacks tensors the model needs, or has tensors the model does not know."""

    def __init__(self, component: str, missing: list[str], unexpected: list[str]):
        self.component = component
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} tensor(s): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} tensor(s): {', '.join(self.unexpected)}")
        super().__init__(f"{component}: " + "; ".join(parts))


class TokenizationError(RuntimeErrorBase):
    """Text or ids cannot be turned into a valid token sequence."""


class SpanError(TokenizationError):
    """A sequence of ids breaks the image-span grammar (bad header, wrong code count, stray marker)."""


class ImageInputError(RuntimeErrorBase):
    """An input image is unreadable, corrupt, too large, or of an unsupported kind."""


class GenerationError(RuntimeErrorBase):
    """A generation request is invalid (bad options, context too long) or failed while running."""


class ContextTooLongError(GenerationError):
    """The prompt plus the requested generation does not fit the model's context window."""


class CacheError(RuntimeErrorBase):
    """The prefix cache got an inconsistent request: bad block shape, uncached prefix, unbalanced pins."""


class EngineBusyError(GenerationError):
    """The engine's queue is full; retry later or raise its `max_queue`."""


class EngineClosedError(GenerationError):
    """The engine was closed; no more requests are taken."""


class RequestCancelled(GenerationError):
    """The request was cancelled before it finished."""


class RequestTimeout(GenerationError):
    """The request ran past its deadline and was stopped."""
