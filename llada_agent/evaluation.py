"""Semantic evaluation on the tiny shapes world, through the public SDK.

Every family of `runtime.tiny.tasks` is replayed as a user would: pictures go in as PNGs, answers are read
as text, drawings are decoded to pixels and read back by the world's pixel checker. Nothing looks at ids.
Used by `bench/tiny_eval.py` (full numbers) and by the tests (a small sample, lower thresholds), so a
regression anywhere in the stack — tokens, sampler, cache, sessions, vision — shows up as lost accuracy.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from runtime.tiny import tasks
from runtime.tiny.world import Scene, SceneReadError, read_scene, render, same_scene_described

from .agents.think_draw import ThinkDrawAgent
from .hooks import Accept, Drawing, Redraw
from .model import Model
from .schemas import EditOptions, ImageOptions, ImagePart, Reply, TextOptions, TextPart, ThinkOptions

INPUT_PIXELS = 96  # pictures are handed in at this size; the tokenizer fits them to its own


@dataclass
class EvalConfig:
    """How the evaluation samples and decodes: `samples` examples per family, fixed `seed`."""

    samples: int = 50
    seed: int = 1234
    decoder_mode: str | None = None  # None: the model's default
    decoder_steps: int | None = None
    image_steps: int = 8
    families: Sequence[str] = field(default_factory=lambda: list(ALL_METRICS))


def _picture(scene: Scene) -> ImagePart:
    return ImagePart.from_pil(render(scene, INPUT_PIXELS))


def _scene_of(image: ImagePart | None) -> Scene | None:
    if image is None or image.png is None:
        return None
    try:
        return read_scene(image.pil())
    except SceneReadError:
        return None


def _user_parts(example: tasks.Example, turn: int) -> tuple[list[ImagePart], str]:
    parts = example.turns[turn].parts
    images = [_picture(p.scene) for p in parts if isinstance(p, tasks.ScenePart)]
    text = " ".join(p.text for p in parts if isinstance(p, tasks.TextPart))
    return images, text


def _target_scenes(example: tasks.Example) -> list[Scene]:
    return [p.scene for p in example.target.parts if isinstance(p, tasks.ScenePart)]


class Evaluator:
    """Runs one example of a family through a fresh session and says whether the model got it right."""

    def __init__(self, model: Model, config: EvalConfig):
        self.model = model
        self.config = config
        decode = {"decoder_mode": config.decoder_mode, "decoder_steps": config.decoder_steps}
        self.image = ImageOptions(steps=config.image_steps, **decode)
        self.edit_options = EditOptions(steps=config.image_steps, **decode)
        self.text = TextOptions(max_tokens=96)

    async def qa(self, example: tasks.Example) -> bool:
        """Each user turn sent in one chat session (a follow-up question keeps the model's own earlier reply in
        the history, right or wrong); the last reply is scored."""
        session = self.model.session(mode="chat", system=example.system)
        reply: Reply | None = None
        for turn in range(0, len(example.turns), 2):
            images, text = _user_parts(example, turn)
            reply = await session.send([*images, text], task="chat", options=self.text)
        return reply is not None and reply.text.strip() == example.target.parts[0].text.strip()

    caption = qa_followup = qa

    async def t2i(self, example: tasks.Example) -> bool:
        _, prompt = _user_parts(example, 0)
        session = self.model.session(mode="draw", system=example.system)
        reply = await session.send(prompt, task="draw", options=self.image)
        return _scene_of(reply.image) == _target_scenes(example)[0]

    riddle_direct = t2i

    async def riddle_thinking(self, example: tasks.Example) -> bool:
        _, prompt = _user_parts(example, 0)
        session = self.model.session(mode="think", system=example.system)
        reply = await session.send(prompt, task="think", options=self._think())
        return _scene_of(reply.image) == _target_scenes(example)[0]

    async def edit(self, example: tasks.Example) -> bool:
        images, instruction = _user_parts(example, 0)
        session = self.model.session(mode="edit", system=example.system)
        reply = await session.send([*images, instruction], task="edit", options=self.edit_options)
        return _scene_of(reply.image) == _target_scenes(example)[0]

    async def multiturn(self, example: tasks.Example) -> bool:
        session = self.model.session(mode="draw", system=example.system)
        reply: Reply | None = None
        for turn in range(0, len(example.turns), 2):
            _, text = _user_parts(example, turn)
            reply = await session.send(text, task="draw", options=self.image)
        return reply is not None and _scene_of(reply.image) == _target_scenes(example)[0]

    async def story_consistency(self, example: tasks.Example) -> bool:
        return story_is_consistent(example, await self.story(example))

    async def story(self, example: tasks.Example) -> Reply:
        """A story example's prompt told by the model, as many frames asked as the example has."""
        _, prompt = _user_parts(example, 0)
        session = self.model.session(mode="story", system=example.system)
        return await session.story(prompt, max_frames=len(_target_scenes(example)))

    async def critique(self, example: tasks.Example, *, critic: bool) -> bool:
        """A thinking riddle drawn by the think-then-draw agent, with or without self-critique."""
        _, prompt = _user_parts(example, 0)
        session = self.model.session(mode="think", system=example.system)
        agent = ThinkDrawAgent(session, critic=self._caption_critic(session) if critic else False,
                               max_redraws=2, options=self._think())
        result = await agent.run(prompt)
        return _scene_of(result.reply.image) == _target_scenes(example)[0]

    def _think(self) -> ThinkOptions:
        return ThinkOptions(max_tokens=128, image=self.image)

    def _caption_critic(self, session) -> Callable[[Drawing], Awaitable[Accept | Redraw]]:
        """The model captions its own drawing; a caption that disagrees with the plan's conclusion sends the
        picture back to be drawn again, sampled this time."""

        async def critic(drawing: Drawing) -> Accept | Redraw:
            planned = drawing.plan.strip().rsplit("so ", 1)[-1]
            viewer = self.model.session(mode="chat", system=tasks.SYSTEM_UNDERSTANDING)
            seen = await viewer.send([drawing.image, "describe the image."], task="chat", options=self.text)
            if same_scene_described(seen.text, planned):
                return Accept()
            retry = self.image.model_copy(update={"temperature": 1.0, "seed": drawing.attempt + 1})
            return Redraw(options=retry)

        return critic


def story_frames(reply: Reply) -> list[tuple[str, Scene | None]]:
    """A story reply's frames: the text before each picture, and the scene the picture shows (None when
    the world's checker cannot read it)."""
    frames, text = [], ""
    for part in reply.parts:
        if isinstance(part, TextPart):
            text += part.text
        elif isinstance(part, ImagePart):
            frames.append((text.strip(), _scene_of(part)))
            text = ""
    return frames


def story_is_consistent(example: tasks.Example, reply: Reply) -> bool:
    """Whether the reply tells the example's number of frames, each picture readable and consistent with
    its text and the frame before (`tasks.check_story`)."""
    frames = story_frames(reply)
    return (len(frames) == len(_target_scenes(example)) and all(scene is not None for _, scene in frames)
            and tasks.check_story(frames))


ALL_METRICS = ("qa", "caption", "t2i", "riddle_thinking", "riddle_direct", "edit", "multiturn",
               "story_consistency", "holdout_t2i", "holdout_qa", "critique_gain", "qa_followup")

_HOLDOUT = {"holdout_t2i": "t2i", "holdout_qa": "qa"}


async def evaluate(model: Model, config: EvalConfig | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Accuracy per metric (fraction of `config.samples` fresh examples answered right)."""
    config = config or EvalConfig()
    evaluator = Evaluator(model, config)
    scores: dict[str, float] = {}
    for metric in config.families:
        rng = random.Random(f"{config.seed}-{metric}")
        hits = 0
        for i in range(config.samples):
            if metric == "critique_gain":
                example = tasks.sample_example("riddle_thinking", rng, holdout="exclude")
                while len(_target_scenes(example)[0]) < 3:
                    example = tasks.sample_example("riddle_thinking", rng, holdout="exclude")
                hits += int(await evaluator.critique(example, critic=True))
                hits -= int(await evaluator.critique(example, critic=False))
            else:
                family = _HOLDOUT.get(metric, "story" if metric == "story_consistency" else metric)
                holdout = "only" if metric in _HOLDOUT else "exclude"
                example = tasks.sample_example(family, rng, holdout=holdout)
                method = getattr(evaluator, metric if metric not in _HOLDOUT else family)
                hits += int(await method(example))
            if progress is not None:
                progress(metric, i + 1, config.samples)
        scores[metric] = round(hits / config.samples, 3)
    return scores
