"""The SDK's typed errors: one root, a few kinds a caller can act on, and the mapping from engine errors.

Every error the SDK raises on purpose is an `LLaDAError`. Errors coming up from the engine (`runtime`) are
wrapped into the matching SDK kind with the original attached as `__cause__`.
"""

from __future__ import annotations

from runtime import errors as rt


class LLaDAError(Exception):
    """Root of every error the SDK raises on purpose."""


class InvalidInputError(LLaDAError, ValueError):
    """An argument, option, message or part is invalid; the message says which and why."""


class ImageError(InvalidInputError):
    """An input image is unreadable, corrupt, too large, or a part holds no picture where one is needed."""


class ContextLengthError(InvalidInputError):
    """The conversation plus the requested generation does not fit the model's context window."""


class ModelLoadError(LLaDAError):
    """A checkpoint is missing, incomplete or inconsistent, or a component could not be loaded."""


class SessionFileError(LLaDAError):
    """A saved session is unreadable, from another checkpoint, or fails validation (tampered or corrupt)."""


class GenerationFailed(LLaDAError):
    """The engine could not finish a generation (a failed forward, an invalid request it refused)."""


class MalformedOutputError(GenerationFailed):
    """The model wrote ids that break the format where no graceful recovery exists."""


class Busy(LLaDAError):
    """The session already runs a turn, or the engine's queue is full; retry, or `fork()` the session."""


class Cancelled(LLaDAError):
    """The turn was cancelled (by `Session.cancel()` or the engine) before it finished."""


class Timeout(LLaDAError):
    """The turn ran past its deadline and was stopped."""


class ModelClosed(LLaDAError):
    """The model is not started or was closed; use `async with llada_agent.load(...) as model`."""


class SessionNotFound(LLaDAError):
    """A server has no session of this id (never created, deleted, or dropped to make room)."""


def wrap(error: BaseException) -> BaseException:
    """Return the SDK error for an engine error (cause attached); other exceptions come back unchanged."""
    kind: type[LLaDAError] | None = None
    if isinstance(error, LLaDAError) or not isinstance(error, rt.RuntimeErrorBase):
        return error
    if isinstance(error, rt.ContextTooLongError):
        kind = ContextLengthError
    elif isinstance(error, rt.EngineBusyError):
        kind = Busy
    elif isinstance(error, rt.EngineClosedError):
        kind = ModelClosed
    elif isinstance(error, rt.RequestCancelled):
        kind = Cancelled
    elif isinstance(error, rt.RequestTimeout):
        kind = Timeout
    elif isinstance(error, rt.ImageInputError):
        kind = ImageError
    elif isinstance(error, rt.CheckpointError):
        kind = ModelLoadError
    elif isinstance(error, rt.SpanError):
        kind = MalformedOutputError
    elif isinstance(error, rt.TokenizationError):
        kind = InvalidInputError
    else:
        kind = GenerationFailed
    wrapped = kind(str(error))
    wrapped.__cause__ = error
    return wrapped
