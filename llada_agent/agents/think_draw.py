"""Think, draw, check, redraw: a think-then-draw turn whose picture is checked by the model itself.

After each drawing the critic asks the same model, in a fork of the session (the conversation so far,
sharing its cached prefix), whether the picture matches the request and the plan. A "yes" keeps it;
anything else sends the turn back with the answer as feedback: the model thinks on with it and draws
again, up to `max_redraws` times.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .. import prompts
from ..hooks import Accept, Drawing, DrawingVerdict, Hooks, Redraw
from ..schemas import ImagePart, Reply, TextOptions, ThinkOptions
from ..session import Session, TurnStream

Critic = Callable[[Drawing], DrawingVerdict | Awaitable[DrawingVerdict]]


class Attempt(BaseModel):
    """One drawing of the turn and what the critic said about it."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    plan: str
    image: ImagePart
    verdict: Literal["accept", "redraw"]
    critique: str | None = None


class AgentResult(BaseModel):
    """The final reply (in the session's history), every attempt, and whether the last one was accepted."""

    model_config = ConfigDict(frozen=True)

    reply: Reply
    attempts: list[Attempt]
    accepted: bool


class ThinkDrawAgent:
    """Think-then-draw turns in `session`, each picture checked by a critic and redrawn on a mismatch.

    `critic`: True asks the model itself (see module docstring); False accepts every picture; a callable
    takes the `Drawing` and returns `Accept`, `Redraw` or None. `hooks` run too (a verdict from their
    `after_drawing` wins over the critic's)."""

    def __init__(self, session: Session, *, critic: bool | Critic = True, max_redraws: int = 2,
                 options: ThinkOptions | None = None, critic_options: TextOptions | None = None,
                 hooks: Hooks | None = None):
        self.session = session
        self.critic = critic
        self.options = ThinkOptions.model_validate({**dict(options or ThinkOptions()), "max_redraws": max_redraws})
        self.critic_options = critic_options or TextOptions(max_tokens=64)
        self.hooks = hooks or Hooks()
        self.attempts: list[Attempt] = []

    async def run(self, prompt: str) -> AgentResult:
        """Run one checked think-then-draw turn for `prompt`."""
        self.attempts = []
        reply = await self.session.send(prompt, task="think", options=self.options, hooks=self._hooks())
        return self._result(reply)

    def stream(self, prompt: str) -> TurnStream:
        """The same turn as `run`, as a stream of events (`attempts` fill in as it goes)."""
        self.attempts = []
        return self.session.stream(prompt, task="think", options=self.options, hooks=self._hooks())

    def _result(self, reply: Reply) -> AgentResult:
        accepted = bool(self.attempts) and self.attempts[-1].verdict == "accept"
        return AgentResult(reply=reply, attempts=list(self.attempts), accepted=accepted)

    def _hooks(self) -> Hooks:
        return Hooks(after_thinking=self.hooks.after_thinking, before_drawing=self.hooks.before_drawing,
                     after_drawing=self._after_drawing, on_event=self.hooks.on_event)

    async def _after_drawing(self, drawing: Drawing) -> DrawingVerdict:
        verdict: Any = None
        critique = None
        if self.hooks.after_drawing is not None:
            verdict = await _maybe_await(self.hooks.after_drawing(drawing))
        if verdict is None and self.critic is True:
            verdict, critique = await self.critique(drawing)
        elif verdict is None and callable(self.critic):
            verdict = await _maybe_await(self.critic(drawing))
        if isinstance(verdict, Redraw) and critique is None:
            critique = verdict.feedback
        self.attempts.append(Attempt(attempt=drawing.attempt, plan=drawing.plan, image=drawing.image,
                                     verdict="redraw" if isinstance(verdict, Redraw) else "accept",
                                     critique=critique))
        return verdict

    async def critique(self, drawing: Drawing) -> tuple[Accept | Redraw, str]:
        """Ask the model (in a fork of the session) whether `drawing` matches; returns the verdict and the
        model's answer."""
        question = prompts.render("critic_question.j2", prompt=drawing.prompt, plan=drawing.plan)
        answer = await self.session.fork().ask(question, image=drawing.image, options=self.critic_options)
        text = answer.text.strip()
        if text.lower().startswith("yes"):
            return Accept(), text
        return Redraw(feedback=text or "the picture does not match the request"), text


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
