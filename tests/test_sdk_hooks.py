"""Hooks of a think-then-draw turn, and the think-draw agent whose critic is the model itself."""

import asyncio

import pytest

import llada_agent
from llada_agent import (
    Accept,
    Draw,
    Hooks,
    ImageOptions,
    InvalidInputError,
    Redraw,
    Revise,
    Skip,
    ThinkOptions,
)
from llada_agent.agents import ThinkDrawAgent
from llada_agent.prompts import render
from llada_agent.testing import scripted_text, write_tiny_model

OPTIONS = ThinkOptions(image=ImageOptions(grid=(2, 2), steps=2, decode=False))


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = llada_agent.load(write_tiny_model(tmp_path_factory.mktemp("hooks") / "tiny", vision=False))
    run(model.start())
    yield model
    run(model.close())


def planned(model, text, grid):
    """What a model writes when it plans `text` and opens a `grid` image."""
    return model.codec.encode_text(text) + model.codec.image_header(*grid)


def test_hooks_are_called_in_order_and_a_redraw_thinks_on_with_the_feedback(model):
    calls = []

    def after_thinking(review):
        calls.append(("after_thinking", review.attempt, review.plan, review.grid))

    async def before_drawing(plan):
        calls.append(("before_drawing", plan.attempt, plan.grid))

    def after_drawing(drawing):
        calls.append(("after_drawing", drawing.attempt, drawing.image.grid))
        return Redraw(feedback="make it wider") if drawing.attempt == 0 else Accept()

    hooks = Hooks(after_thinking=after_thinking, before_drawing=before_drawing, after_drawing=after_drawing)
    session = model.session(mode="think")
    with scripted_text(model, [planned(model, "tall", (2, 1)), planned(model, " wider now", (1, 2))]) as script:
        reply = run(session.send("a tree", options=OPTIONS, hooks=hooks))
    feedback = render("redraw_feedback.j2", feedback="make it wider")
    assert calls == [
        ("after_thinking", 0, "tall", (2, 1)), ("before_drawing", 0, (2, 1)), ("after_drawing", 0, (2, 1)),
        ("after_thinking", 1, "tall" + feedback + " wider now", (1, 2)), ("before_drawing", 1, (1, 2)),
        ("after_drawing", 1, (1, 2)),
    ]
    assert script.requests[1].prompt[-len(model.codec.encode_text(feedback)):] == model.codec.encode_text(feedback)
    assert reply.thinking == "tall" + feedback + " wider now" and reply.image.grid == (1, 2)
    model.codec.parse(session.ids)


def test_after_thinking_can_rewrite_the_plan_and_the_grid(model):
    hooks = Hooks(after_thinking=lambda review: Revise(plan="a better plan", grid=(1, 1)))
    session = model.session(mode="think")
    with scripted_text(model, [planned(model, "first plan", (2, 2))]):
        reply = run(session.send("a tree", options=OPTIONS, hooks=hooks))
    assert reply.thinking == "a better plan" and reply.image.grid == (1, 1)
    assert reply.ids[: len(model.codec.encode_text("a better plan"))] == model.codec.encode_text("a better plan")


def test_before_drawing_can_skip_the_picture(model):
    session = model.session(mode="think")
    with scripted_text(model, [planned(model, "plan", (2, 2))]):
        reply = run(session.send("a tree", options=OPTIONS, hooks=Hooks(before_drawing=lambda p: Skip(reason="no"))))
    assert reply.finish_reason == "skipped" and reply.images == [] and reply.thinking == "plan"
    assert session.ids[-1] == model.codec.special.eos


def test_before_drawing_can_change_the_options(model):
    session = model.session(mode="think")
    hooks = Hooks(before_drawing=lambda p: Draw(options=p.options.model_copy(update={"steps": 1})))
    with scripted_text(model, [planned(model, "plan", (2, 2))]):
        reply = run(session.send("a tree", options=OPTIONS, hooks=hooks))
    assert reply.usage.steps == 1


def test_redraws_stop_at_the_limit(model):
    session = model.session(mode="think")
    options = OPTIONS.model_copy(update={"max_redraws": 1})
    hooks = Hooks(after_drawing=lambda drawing: Redraw())
    with scripted_text(model, [planned(model, "plan", (2, 2))]):
        reply = run(session.send("a tree", options=options, hooks=hooks))
    assert reply.usage.requests == 4  # one thinking, its header's grid sizes, two drawings
    assert any("limit" in warning for warning in reply.warnings)


def test_a_hook_returning_the_wrong_type_fails_the_turn_and_keeps_the_history(model):
    session = model.session(mode="think")
    with scripted_text(model, [planned(model, "plan", (2, 2))]), pytest.raises(InvalidInputError, match="Redraw"):
        run(session.send("a tree", options=OPTIONS, hooks=Hooks(after_drawing=lambda drawing: "yes")))
    assert len(session.messages) == 1


def test_the_agent_redraws_until_its_critic_says_yes(model):
    session = model.session(mode="think")
    eos = [model.codec.special.eos]
    script = [
        planned(model, "plan", (2, 2)),
        model.codec.encode_text("no, it is too dark") + eos,  # the critic, asked in a fork
        planned(model, " brighter", (2, 2)),
        model.codec.encode_text("yes, it matches") + eos,
    ]
    agent = ThinkDrawAgent(session, options=OPTIONS)
    with scripted_text(model, script) as scripted:
        result = run(agent.run("a sunny day"))
    assert result.accepted and [a.verdict for a in result.attempts] == ["redraw", "accept"]
    assert result.attempts[0].critique == "no, it is too dark"
    assert "too dark" in result.reply.thinking
    critic_prompt = model.codec.decode([t for t in scripted.requests[1].prompt if t < model.codec.image_token_offset])
    assert "a sunny day" in critic_prompt
    assert len(session.messages) == 3  # the critic's questions stayed in its forks


def test_the_agent_takes_a_callable_critic(model):
    session = model.session(mode="think")
    seen = []

    async def critic(drawing):  # says nothing: the picture is accepted
        seen.append(drawing.plan)

    with scripted_text(model, [planned(model, "plan", (2, 2))]):
        result = run(ThinkDrawAgent(session, critic=critic, options=OPTIONS).run("a tree"))
    assert seen == ["plan"] and result.accepted
