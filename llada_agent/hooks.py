"""Hook points of a think-then-draw turn, with typed inputs and outputs.

```
think -> after_thinking(PlanReview) -> before_drawing(DrawPlan) -> draw -> after_drawing(Drawing)
                                            ^                                        |
                                            +------------- Redraw(feedback) ---------+
```
A hook is a plain function or coroutine function taking one input model. Returning None keeps the default
(approve the plan, draw as planned, accept the picture). `on_event` sees every event of the turn.

With `Redraw(feedback=...)` the feedback is appended to the model's thinking and the model thinks on
(it may choose a new grid) before drawing again; without feedback it only redraws (e.g. with new
`options`). At most `ThinkOptions.max_redraws` redraws happen per turn.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import InvalidInputError
from .schemas import Grid, ImageOptions, ImagePart


class _HookModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class PlanReview(_HookModel):
    """After thinking: the user's request, the model's plan and the grid it chose; `attempt` counts redraws."""

    prompt: str
    plan: str
    grid: Grid
    attempt: int


class Approve(_HookModel):
    """Keep the plan as the model wrote it."""

    type: Literal["approve"] = "approve"


class Revise(_HookModel):
    """Replace the plan's text (`plan`) and/or the grid to draw (`grid`)."""

    type: Literal["revise"] = "revise"
    plan: str | None = None
    grid: Grid | None = None


class DrawPlan(_HookModel):
    """Before drawing: what will be drawn, on which grid, with which options."""

    prompt: str
    plan: str
    grid: Grid
    options: ImageOptions
    attempt: int


class Draw(_HookModel):
    """Draw, optionally with other options (the grid stays the plan's)."""

    type: Literal["draw"] = "draw"
    options: ImageOptions | None = None


class Skip(_HookModel):
    """Do not draw: the turn ends with the thinking only (finish_reason "skipped")."""

    type: Literal["skip"] = "skip"
    reason: str = ""


class Drawing(_HookModel):
    """After drawing: the picture (decoded when the turn decodes) and the plan it was drawn from."""

    prompt: str
    plan: str
    image: ImagePart
    attempt: int


class Accept(_HookModel):
    """Keep the picture."""

    type: Literal["accept"] = "accept"


class Redraw(_HookModel):
    """Draw again: with `feedback` the model thinks on with it first; `options` replace the image options."""

    type: Literal["redraw"] = "redraw"
    feedback: str | None = None
    options: ImageOptions | None = None


PlanDecision = Approve | Revise | None
DrawDecision = Draw | Skip | None
DrawingVerdict = Accept | Redraw | None

Hook = Callable[[Any], Any]


@dataclass(frozen=True)
class Hooks:
    """The hooks of a think-then-draw turn; each is optional, sync or async."""

    after_thinking: Callable[[PlanReview], PlanDecision | Awaitable[PlanDecision]] | None = None
    before_drawing: Callable[[DrawPlan], DrawDecision | Awaitable[DrawDecision]] | None = None
    after_drawing: Callable[[Drawing], DrawingVerdict | Awaitable[DrawingVerdict]] | None = None
    on_event: Callable[[Any], None | Awaitable[None]] | None = None


async def call_hook(name: str, hook: Hook | None, value: Any, allowed: tuple[type, ...]) -> Any:
    """The hook's answer to `value` (awaited when it is a coroutine), checked against `allowed`; None when
    there is no hook or it returned None."""
    if hook is None:
        return None
    result = hook(value)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, allowed):
        names = ", ".join(t.__name__ for t in allowed)
        raise InvalidInputError(f"hook {name} returned {type(result).__name__}; expected {names} or None")
    return result
