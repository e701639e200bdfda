"""The bundled tiny model understands, draws, edits and tells stories — checked through the public SDK.

Small samples and thresholds below the benchmark's targets (bench/tiny_eval.py reports the full numbers);
a regression anywhere in the stack — tokens, sampler, cache, sessions, vision — loses accuracy here.
"""

import asyncio
import random

import pytest

import llada_agent
from llada_agent import Hooks, ImagePart, PlanReview, Revise
from llada_agent.evaluation import EvalConfig, evaluate
from runtime.tiny import tasks
from runtime.tiny.world import Scene, Shape, describe, read_scene, render


@pytest.fixture(scope="module")
def scores():
    async def main():
        async with llada_agent.load("tiny") as model:
            config = EvalConfig(samples=10, seed=7, families=["qa", "caption", "t2i", "riddle_thinking", "edit",
                                                              "multiturn", "holdout_t2i", "qa_followup"])
            return await evaluate(model, config)

    return asyncio.run(main())


@pytest.mark.parametrize("metric,floor", [("qa", 0.6), ("caption", 0.6), ("t2i", 0.6), ("riddle_thinking", 0.4),
                                          ("edit", 0.6), ("multiturn", 0.5), ("holdout_t2i", 0.3),
                                          ("qa_followup", 0.3)])
def test_accuracy_on_fresh_scenes(scores, metric, floor):
    assert scores[metric] >= floor, scores


def test_streamed_thinking_drawings_plan_then_draw_what_they_planned():
    """Each riddle streams its plan before its picture, and the picture is what the plan concluded
    ("...; so a blue circle at the center.") for most of them: a plan that garbles its copy of the riddle
    may still draw right, so a few may disagree (runtime/tiny/README.md measures how many)."""
    rng = random.Random(5)
    riddles = [tasks.sample_example("riddle_thinking", rng).turns[0].parts[0].text for _ in range(6)]

    async def main():
        async with llada_agent.load("tiny") as model:
            streams = []
            for riddle in riddles:
                async with model.session(mode="think").stream(riddle, task="think") as stream:
                    streams.append([event async for event in stream])
            return streams

    agreed = 0
    for events in asyncio.run(main()):
        kinds = [e.type for e in events]
        assert kinds.index("thinking_block") < kinds.index("image_started") < kinds.index("image_decoded")
        reply = events[-1].reply
        agreed += reply.thinking.strip().endswith(f"so {describe(read_scene(reply.image.pil()))}.")
    assert agreed >= 5, f"{agreed} of {len(riddles)} pictures are what their plan concluded"


def test_a_follow_up_question_reuses_the_cached_picture():
    async def main():
        async with llada_agent.load("tiny") as model:
            chat = model.session(mode="chat")
            picture = ImagePart.from_pil(render(Scene.of(Shape("square", "green", "left")), 96))
            first = await chat.ask("what color is the square?", image=picture)
            second = await chat.ask("where is the square?")
            return first, second

    first, second = asyncio.run(main())
    assert first.text.strip() == "green"
    # The whole first turn (system, picture, question, answer) is reused, not recomputed.
    assert second.usage.cached_tokens >= (first.usage.prompt_tokens // 32) * 32


def test_a_plan_revised_by_a_hook_is_what_gets_drawn():
    """`after_thinking` sees the model's own plan and replaces it (here a reviewer who wants green, whatever
    the riddle said); the picture follows the revised plan, not the model's."""
    revised = "round means circle; the color of a leaf is green; so a green circle at the center."
    seen: list[PlanReview] = []

    def revise(review: PlanReview) -> Revise:
        seen.append(review)
        return Revise(plan=revised)

    async def main():
        async with llada_agent.load("tiny") as model:
            session = model.session(mode="think")
            return await session.draw("draw a shape that is round in the color of the sky at the center.",
                                      thinking=True, hooks=Hooks(after_thinking=revise))

    reply = asyncio.run(main())
    # The hook saw the model's own plan (a sky riddle: it does not conclude green).
    assert len(seen) == 1 and seen[0].plan.strip() and "green" not in seen[0].plan
    assert reply.thinking == revised
    assert read_scene(reply.image.pil()) == Scene.of(Shape("circle", "green", "center"))


def test_the_demo_answers_draws_and_edits_right(tmp_path, capsys):
    """`llada-agent demo`, the README's first command: its chat answers are right, its riddle picture is the
    riddle's answer, its edit changes only what was asked, and the page it writes shows every picture."""
    from PIL import Image

    from llada_agent.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "model: a red circle at the top-left and a blue square at the center\n" in printed
    assert "model: square\n" in printed
    assert read_scene(Image.open(tmp_path / "riddle.png")) == Scene.of(Shape("circle", "blue", "center"))
    assert read_scene(Image.open(tmp_path / "edit.png")) == Scene.of(Shape("circle", "green", "top-left"),
                                                                     Shape("square", "blue", "center"))
    page = (tmp_path / "demo.html").read_text()
    # The picture shown, with each chat question and the edit; then the riddle's, the edit's, three frames.
    assert page.count("<img") == 3 + 1 + 1 + 3
