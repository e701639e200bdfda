"""Training and evaluation examples for the tiny world, as plain data: no tokenizer, no chat template.

An `Example` is a system prompt and a list of turns; each turn holds text, thinking text and scenes (drawn
to pictures later by whoever trains or evaluates). The last turn is the assistant's target. Every answer is
computed from the scenes, so an evaluator can check a model's output exactly.

Held out of all training data (`holdout="exclude"`), and generated alone for evaluation (`holdout="only"`):
every example with a purple triangle in any of its scenes (or naming one in its text), and every riddle
whose answer holds an orange square at the bottom-right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from runtime.errors import RuntimeErrorBase
from runtime.tiny.world import (
    CELLS,
    COLORS,
    MAX_SHAPES,
    SHAPES,
    Scene,
    Shape,
    article,
    cell_at,
    cell_position,
    describe,
    is_holdout_scene,
    join_phrases,
    opposite,
    sample_scene,
    shape_phrase,
)

# System prompts of the official tasks (MODEL_SPEC section 5).
SYSTEM_T2I = "You are a text-to-image generation assistant."
SYSTEM_THINKING = "You are a text-to-image generation assistant with a thinking process."
SYSTEM_UNDERSTANDING = "You are a multimodal understanding assistant."
SYSTEM_EDITING = "You are an image editing assistant."
SYSTEM_INTERLEAVED = "You are an interleaved text and image assistant."

FAMILIES: tuple[str, ...] = (
    "caption", "qa", "t2i", "riddle_thinking", "riddle_direct", "edit", "multiturn", "story", "qa_followup",
)
HOLDOUT_MODES: tuple[str, ...] = ("exclude", "only", "any")
DEFAULT_WEIGHTS: dict[str, float] = {
    "caption": 1.0, "qa": 2.0, "t2i": 2.0, "riddle_thinking": 1.0, "riddle_direct": 1.0,
    "edit": 1.5, "multiturn": 1.0, "story": 1.0,
}

HOLDOUT_PURPLE_TRIANGLE = "purple_triangle"
HOLDOUT_RIDDLE_ORANGE_SQUARE = "riddle_orange_square"
RIDDLE_FAMILIES = ("riddle_thinking", "riddle_direct")
_RIDDLE_HELD_OUT = Shape("square", "orange", "bottom-right")

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")


class TaskError(RuntimeErrorBase, ValueError):
    """A task request is invalid (unknown family or holdout mode, bad weights) or cannot be met."""


@dataclass(frozen=True)
class TextPart:
    """Plain text in a turn."""

    text: str


@dataclass(frozen=True)
class ThinkPart:
    """The assistant's thinking text: a short plan written before the picture."""

    text: str


@dataclass(frozen=True)
class ScenePart:
    """A picture of `scene` in a turn (rendered by the consumer)."""

    scene: Scene


Part = TextPart | ThinkPart | ScenePart


@dataclass(frozen=True)
class Turn:
    """One message: who speaks ("user" or "assistant") and its parts in order."""

    role: str
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise TaskError(f"turn role must be 'user' or 'assistant', got {self.role!r}")


@dataclass(frozen=True)
class Example:
    """One conversation of a task family; the last turn is the assistant's target."""

    family: str
    system: str
    turns: tuple[Turn, ...]
    subtype: str = ""
    # The cells of the asked picture whose contents decide a question's answer (the shape asked about, the
    # shapes counted, the cell asked after); training guides the answer's attention there. Empty elsewhere.
    focus: tuple[str, ...] = ()

    @property
    def target(self) -> Turn:
        """The final assistant turn, the one a model is trained to produce."""
        return self.turns[-1]

    def scenes(self) -> tuple[Scene, ...]:
        """Every scene in the example, inputs and outputs, in order."""
        return tuple(p.scene for t in self.turns for p in t.parts if isinstance(p, ScenePart))

    def texts(self) -> tuple[str, ...]:
        """Every text and thinking string in the example, in order (the system prompt excluded)."""
        return tuple(p.text for t in self.turns for p in t.parts if isinstance(p, (TextPart, ThinkPart)))


def _user(*parts: Part) -> Turn:
    return Turn("user", tuple(parts))


def _assistant(*parts: Part) -> Turn:
    return Turn("assistant", tuple(parts))


# ---- holdout -------------------------------------------------------------------------------------------

_PURPLE_TRIANGLE_TEXT = re.compile(r"\bpurple triangles?\b")


def holdout_kinds(example: Example) -> frozenset[str]:
    """Return which held-out groups the example belongs to (empty for ordinary training data)."""
    kinds = set()
    if any(is_holdout_scene(s) for s in example.scenes()) or any(
            _PURPLE_TRIANGLE_TEXT.search(t) for t in example.texts()):
        kinds.add(HOLDOUT_PURPLE_TRIANGLE)
    if example.family in RIDDLE_FAMILIES and any(_RIDDLE_HELD_OUT in s.shapes for s in example.scenes()):
        kinds.add(HOLDOUT_RIDDLE_ORANGE_SQUARE)
    return frozenset(kinds)


def is_holdout_example(example: Example) -> bool:
    """Return whether the example is held out of all training data."""
    return bool(holdout_kinds(example))


class _Scenes:
    """Draws the scenes of one example: under "only" the first scene drawn gets a purple triangle."""

    def __init__(self, rng: random.Random, holdout: str):
        self.rng = rng
        self.holdout = holdout
        self._owe_holdout = holdout == "only"

    def draw(self, n_shapes: int | None = None, max_shapes: int = MAX_SHAPES) -> Scene:
        rng = self.rng
        n = rng.randint(1, max_shapes) if n_shapes is None else n_shapes
        include: tuple[Shape, ...] = ()
        if self._owe_holdout:
            include = (Shape("triangle", "purple", rng.choice(CELLS)),)
            self._owe_holdout = False
        allow = (lambda s: not is_holdout_scene(s)) if self.holdout == "exclude" else None
        return sample_scene(rng, n, allow=allow, include=include)


# ---- words ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*|[^\sA-Za-z]")


def split_words(text: str) -> list[str]:
    """Return the words and punctuation marks of `text`; hyphenated names ("top-left") stay one word."""
    return _WORD.findall(text)


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _thing(shape: str, color: str) -> str:
    """E.g. "an orange square"."""
    return f"{article(color)} {color} {shape}"


def _loose_description(rng: random.Random, scene: Scene) -> str:
    """A description in shuffled order with "at" or "in": the ways a user might phrase a request."""
    shapes = list(scene.shapes)
    rng.shuffle(shapes)
    preposition = rng.choice(("at", "in"))
    return join_phrases([shape_phrase(s, preposition) for s in shapes])


def _references(scene: Scene, shape: Shape, avoid: str = "", noun: str = "shape") -> list[str]:
    """Noun phrases that pick out `shape` alone in `scene`, not mentioning the attribute `avoid`."""
    same_shape = [s for s in scene.shapes if s.shape == shape.shape]
    same_color = [s for s in scene.shapes if s.color == shape.color]
    same_both = [s for s in same_shape if s.color == shape.color]
    refs = []
    if avoid != "cell":
        refs.append(f"the {noun} at the {shape.cell}")
    if avoid != "shape" and len(same_shape) == 1:
        refs.append(f"the {shape.shape}")
    if avoid != "color" and len(same_color) == 1:
        refs.append(f"the {shape.color} {noun}")
    if avoid not in ("shape", "color") and len(same_both) == 1:
        refs.append(f"the {shape.color} {shape.shape}")
    return refs


# ---- caption -------------------------------------------------------------------------------------------

CAPTION_PROMPTS = (
    "describe the image.", "what is in the picture?", "write a caption for this image.",
    "what do you see?", "describe what is shown.", "caption this picture.",
)


def _caption(rng: random.Random, scenes: _Scenes) -> Example:
    scene = scenes.draw()
    return Example("caption", SYSTEM_UNDERSTANDING, (
        _user(ScenePart(scene), TextPart(rng.choice(CAPTION_PROMPTS))),
        _assistant(TextPart(describe(scene))),
    ))


# ---- questions -----------------------------------------------------------------------------------------

QA_SUBTYPES = ("color", "shape", "position", "count", "yes_no")
COLOR_QUESTIONS = ("what color is {ref}?", "which color does {ref} have?", "what is the color of {ref}?")
SHAPE_QUESTIONS = ("what shape is {ref}?", "which shape is {ref}?", "what kind of shape is {ref}?")
POSITION_QUESTIONS = ("where is {ref}?", "in which part of the image is {ref}?", "which cell holds {ref}?")
COUNT_ALL_QUESTIONS = ("how many shapes are there?", "how many shapes are in the image?", "count the shapes.")
COUNT_SHAPE_QUESTIONS = ("how many {shapes} are there?", "how many {shapes} do you see?")
COUNT_COLOR_QUESTIONS = ("how many {color} shapes are there?", "how many shapes are {color}?")
EXISTS_QUESTIONS = ("is there {thing}?", "is there {thing} in the image?", "do you see {thing}?")
OCCUPIED_QUESTIONS = ("is there a shape at the {cell}?", "is anything at the {cell}?")
EMPTY_QUESTIONS = ("is the {cell} empty?",)
IS_COLOR_QUESTIONS = ("is the shape at the {cell} {color}?",)
IS_SHAPE_QUESTIONS = ("is the shape at the {cell} a {shape}?",)


def _qa_color(rng: random.Random, scene: Scene) -> tuple[str, str, Scene, tuple[str, ...]]:
    shape = rng.choice(scene.shapes)
    ref = rng.choice(_references(scene, shape, avoid="color"))
    return rng.choice(COLOR_QUESTIONS).format(ref=ref), shape.color, scene, (shape.cell,)


def _qa_shape(rng: random.Random, scene: Scene) -> tuple[str, str, Scene, tuple[str, ...]]:
    shape = rng.choice(scene.shapes)
    ref = rng.choice(_references(scene, shape, avoid="shape", noun="one"))
    return rng.choice(SHAPE_QUESTIONS).format(ref=ref), shape.shape, scene, (shape.cell,)


def _qa_position(rng: random.Random, scene: Scene) -> tuple[str, str, Scene, tuple[str, ...]]:
    shape = rng.choice(scene.shapes)
    if not _references(scene, shape, avoid="cell"):
        # Its kind and its colour both repeat: repaint it in a fresh colour so the question has one answer.
        fresh = rng.choice([c for c in COLORS if c not in {s.color for s in scene.shapes}])
        scene = scene.recolored(shape.cell, fresh)
        shape = scene.at(shape.cell)
    ref = rng.choice(_references(scene, shape, avoid="cell"))
    return rng.choice(POSITION_QUESTIONS).format(ref=ref), shape.cell, scene, (shape.cell,)


def _qa_count(rng: random.Random, scene: Scene) -> tuple[str, str, Scene, tuple[str, ...]]:
    kind = rng.choice(("all", "shape", "color"))
    if kind == "all":
        return rng.choice(COUNT_ALL_QUESTIONS), _count_word(len(scene)), scene, scene.cells
    if kind == "shape":
        name = rng.choice(SHAPES)
        counted = tuple(s.cell for s in scene.shapes if s.shape == name)
        return (rng.choice(COUNT_SHAPE_QUESTIONS).format(shapes=PLURALS[name]), _count_word(len(counted)), scene,
                counted)
    color = rng.choice(COLORS)
    counted = tuple(s.cell for s in scene.shapes if s.color == color)
    return rng.choice(COUNT_COLOR_QUESTIONS).format(color=color), _count_word(len(counted)), scene, counted


def _qa_yes_no(rng: random.Random, scene: Scene) -> tuple[str, str, Scene, tuple[str, ...]]:
    yes = rng.random() < 0.5
    kind = rng.choice(("exists", "occupied", "color", "shape"))
    if kind == "exists":
        present = sorted({(s.shape, s.color) for s in scene.shapes})
        absent = [(sh, co) for sh in SHAPES for co in COLORS if (sh, co) not in present]
        shape, color = rng.choice(present if yes else absent)
        found = tuple(s.cell for s in scene.shapes if (s.shape, s.color) == (shape, color))
        return (rng.choice(EXISTS_QUESTIONS).format(thing=_thing(shape, color)), "yes" if yes else "no", scene,
                found)
    if kind == "occupied":
        occupied = rng.random() < 0.5
        cell = rng.choice(scene.cells if occupied else scene.empty_cells())
        if rng.random() < 0.5:
            return rng.choice(OCCUPIED_QUESTIONS).format(cell=cell), "yes" if occupied else "no", scene, (cell,)
        return rng.choice(EMPTY_QUESTIONS).format(cell=cell), "no" if occupied else "yes", scene, (cell,)
    shape = rng.choice(scene.shapes)
    if kind == "color":
        color = shape.color if yes else rng.choice([c for c in COLORS if c != shape.color])
        return (rng.choice(IS_COLOR_QUESTIONS).format(cell=shape.cell, color=color), "yes" if yes else "no", scene,
                (shape.cell,))
    name = shape.shape if yes else rng.choice([s for s in SHAPES if s != shape.shape])
    return (rng.choice(IS_SHAPE_QUESTIONS).format(cell=shape.cell, shape=name), "yes" if yes else "no", scene,
            (shape.cell,))


# Each asks about a scene and returns (question, answer, scene asked about, cells that decide the answer).
_QA: dict[str, Callable[[random.Random, Scene], tuple[str, str, Scene, tuple[str, ...]]]] = {
    "color": _qa_color, "shape": _qa_shape, "position": _qa_position, "count": _qa_count, "yes_no": _qa_yes_no,
}


def _qa(rng: random.Random, scenes: _Scenes, subtype: str | None = None) -> Example:
    subtype = subtype or rng.choice(QA_SUBTYPES)
    question, answer, scene, focus = _QA[subtype](rng, scenes.draw())
    return Example("qa", SYSTEM_UNDERSTANDING, (
        _user(ScenePart(scene), TextPart(question)),
        _assistant(TextPart(answer)),
    ), subtype, focus)


def _qa_followup(rng: random.Random, scenes: _Scenes, subtype: str | None = None) -> Example:
    """A question about a picture after an earlier exchange about it in the same chat (a caption or another
    question), the picture shown again or not: what a session's second turn looks like."""
    subtype = subtype or rng.choice(QA_SUBTYPES)
    question, answer, scene, focus = _QA[subtype](rng, scenes.draw())
    earlier = _QA[rng.choice(QA_SUBTYPES)](rng, scene) if rng.random() < 0.5 else None
    if earlier is not None and earlier[2] == scene:  # (a position question may repaint its scene)
        first = (TextPart(earlier[0]), TextPart(earlier[1]))
    else:
        first = (TextPart(rng.choice(CAPTION_PROMPTS)), TextPart(describe(scene)))
    again = (ScenePart(scene),) if rng.random() < 0.5 else ()
    return Example("qa_followup", SYSTEM_UNDERSTANDING, (
        _user(ScenePart(scene), first[0]), _assistant(first[1]),
        _user(*again, TextPart(question)), _assistant(TextPart(answer)),
    ), subtype, focus)


# ---- text to image -------------------------------------------------------------------------------------

T2I_PROMPTS = (
    "draw {desc}.", "make a picture of {desc}.", "please draw {desc}.", "create an image with {desc}.",
    "show me {desc}.", "{desc}.", "generate an image of {desc}.",
)


def _t2i(rng: random.Random, scenes: _Scenes) -> Example:
    scene = scenes.draw()
    prompt = rng.choice(T2I_PROMPTS).format(desc=_loose_description(rng, scene))
    return Example("t2i", SYSTEM_T2I, (_user(TextPart(prompt)), _assistant(ScenePart(scene))))


# ---- riddles -------------------------------------------------------------------------------------------

# clue -> the plan sentence that resolves it. Shape clues complete "a shape that ...".
SHAPE_CLUES: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("is round", "round means circle"), ("looks like a ball", "a ball is a circle"),
               ("looks like a wheel", "a wheel is a circle"), ("has no corners", "no corners means circle")),
    "square": (("has four equal sides", "four equal sides means square"),
               ("looks like a box", "a box is a square"), ("looks like a window", "a window is a square")),
    "triangle": (("has three sides", "three sides means triangle"),
                 ("has three corners", "three corners means triangle"),
                 ("looks like a roof", "a roof is a triangle")),
}
# Colour clues are noun phrases; the plan says "<clue> is <color>".
COLOR_CLUES: dict[str, tuple[str, ...]] = {
    "red": ("the color of a cherry", "the color of a strawberry", "the color of a tomato"),
    "green": ("the color of grass", "the color of a leaf", "a mix of blue and yellow"),
    "blue": ("the color of the sky", "the color of the sea"),
    "yellow": ("the color of the sun", "the color of a banana", "the color of a lemon"),
    "purple": ("the color of a grape", "a mix of red and blue"),
    "orange": ("the color of a carrot", "the color of a pumpkin", "a mix of red and yellow"),
}
# Count clues; the plan says "<clue> is <number>".
COUNT_CLUES: dict[int, tuple[str, ...]] = {
    1: ("two minus one", "one less than two", "half of two"),
    2: ("one plus one", "one more than one", "one less than three"),
    3: ("one more than two", "one plus two", "the number of sides of a triangle"),
}
# Cell relations: the phrase, and the (row, column) step from the named cell to the answer.
CELL_RELATIONS: dict[str, tuple[int, int]] = {
    "just above the {ref}": (-1, 0), "just below the {ref}": (1, 0),
    "just left of the {ref}": (0, -1), "just right of the {ref}": (0, 1),
}
OPPOSITE_CLUE = "opposite the {ref}"
RIDDLE_PROMPTS = (
    "draw {what}.", "paint {what}.", "show me {what}.", "make a picture of {what}.", "can you draw {what}?",
)
COUNT_RIDDLE_PHRASE = "{color} {shapes} in the {row} row from the left, as many as {count}"
COUNT_RIDDLE_CLUED_PHRASE = "{shapes} in {clue} in the {row} row from the left, as many as {count}"


def _cell_clues(cell: str) -> list[str]:
    """Every clue phrase whose answer is `cell`."""
    clues = []
    mirrored = opposite(cell)
    if mirrored is not None:
        clues.append(OPPOSITE_CLUE.format(ref=mirrored))
    row, col = cell_position(cell)
    for phrase, (drow, dcol) in CELL_RELATIONS.items():
        ref = cell_at(row - drow, col - dcol)
        if ref is not None:
            clues.append(phrase.format(ref=ref))
    return clues


def _riddle_answer(rng: random.Random, holdout: str) -> tuple[str, str, str, str, int]:
    """Draw (kind, shape, color, cell or row, count); under "only" the answer is a held-out one."""
    kind = rng.choice(("single", "single", "count"))
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    where = rng.choice(CELLS) if kind == "single" else rng.choice(ROWS)
    count = 1 if kind == "single" else rng.randint(1, MAX_SHAPES)
    if holdout == "only":
        if rng.random() < 0.5:
            shape, color = "triangle", "purple"
        else:
            shape, color = "square", "orange"
            where, count = ("bottom-right", 1) if kind == "single" else ("bottom", MAX_SHAPES)
    return kind, shape, color, where, count


def _riddle(rng: random.Random, holdout: str) -> tuple[str, str, Scene, str]:
    """Return (riddle text, plan text, answer scene, kind)."""
    kind, shape, color, where, count = _riddle_answer(rng, holdout)
    plan = []
    if kind == "single":
        answer = Scene.of(Shape(shape, color, where))
        clued = set()
        while not clued:
            clued = {a for a in ("shape", "color", "cell") if rng.random() < 0.5}
        color_clue = rng.choice(COLOR_CLUES[color])
        if "shape" in clued:
            shape_clue, shape_plan = rng.choice(SHAPE_CLUES[shape])
            plan.append(shape_plan)
            noun = f"a shape in {color_clue}" if "color" in clued else f"{article(color)} {color} shape"
            what = f"{noun} that {shape_clue},"
        else:
            what = f"a {shape} in {color_clue}" if "color" in clued else _thing(shape, color)
        if "color" in clued:
            plan.append(f"{color_clue} is {color}")
        if "cell" in clued:
            cell_clue = rng.choice(_cell_clues(where))
            plan.append(f"{cell_clue} is the {where}")
            what += f" {cell_clue}"
        else:
            what += f" at the {where}"
    else:
        row = ROWS.index(where)
        answer = Scene(tuple(Shape(shape, color, CELLS[3 * row + k]) for k in range(count)))
        count_clue = rng.choice(COUNT_CLUES[count])
        plan.append(f"{count_clue} is {_count_word(count)}")
        if rng.random() < 0.5:
            color_clue = rng.choice(COLOR_CLUES[color])
            plan.append(f"{color_clue} is {color}")
            what = COUNT_RIDDLE_CLUED_PHRASE.format(count=count_clue, shapes=PLURALS[shape], clue=color_clue,
                                                    row=where)
        else:
            what = COUNT_RIDDLE_PHRASE.format(count=count_clue, color=color, shapes=PLURALS[shape], row=where)
    plan.append(f"so {describe(answer)}")
    return rng.choice(RIDDLE_PROMPTS).format(what=what), "; ".join(plan) + ".", answer, kind


def _riddle_thinking(rng: random.Random, scenes: _Scenes) -> Example:
    riddle, plan, answer, kind = _riddle(rng, scenes.holdout)
    return Example("riddle_thinking", SYSTEM_THINKING, (
        _user(TextPart(riddle)), _assistant(ThinkPart(plan), ScenePart(answer)),
    ), kind)


def _riddle_direct(rng: random.Random, scenes: _Scenes) -> Example:
    riddle, _, answer, kind = _riddle(rng, scenes.holdout)
    return Example("riddle_direct", SYSTEM_T2I, (_user(TextPart(riddle)), _assistant(ScenePart(answer))), kind)


# ---- editing -------------------------------------------------------------------------------------------

EDIT_OPS = ("recolor", "move", "add", "remove")
RECOLOR_INSTRUCTIONS = (
    "make {ref} {color}.", "change the color of {ref} to {color}.", "paint {ref} {color}.",
    "turn {ref} {color}.", "recolor {ref} to {color}.",
)
MOVE_INSTRUCTIONS = (
    "move {ref} to the {cell}.", "put {ref} at the {cell}.", "place {ref} in the {cell}.",
    "shift {ref} to the {cell}.",
)
ADD_INSTRUCTIONS = ("add {thing} at the {cell}.", "put {thing} in the {cell}.", "also draw {thing} at the {cell}.")
REMOVE_INSTRUCTIONS = ("remove {ref}.", "delete {ref}.", "take away {ref}.", "erase {ref}.")
FOLLOW_UP_PREFIX = "now "


def _edit_source(scenes: _Scenes, op: str) -> Scene:
    if op == "add":
        return scenes.draw(max_shapes=MAX_SHAPES - 1)
    if op == "remove":
        return scenes.draw(n_shapes=scenes.rng.randint(2, MAX_SHAPES))
    return scenes.draw()


def _edit_instruction(rng: random.Random, source: Scene, op: str, it: bool) -> tuple[str, Scene]:
    """Return (instruction, edited scene); `it` refers to a lone shape as "it"."""
    target = rng.choice(source.shapes)
    ref = "it" if it and len(source) == 1 else rng.choice(_references(source, target))
    if op == "recolor":
        color = rng.choice([c for c in COLORS if c != target.color])
        text = rng.choice(RECOLOR_INSTRUCTIONS).format(ref=ref, color=color)
        return text, source.recolored(target.cell, color)
    if op == "move":
        cell = rng.choice(source.empty_cells())
        return rng.choice(MOVE_INSTRUCTIONS).format(ref=ref, cell=cell), source.moved(target.cell, cell)
    if op == "add":
        new = Shape(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(source.empty_cells()))
        text = rng.choice(ADD_INSTRUCTIONS).format(thing=_thing(new.shape, new.color), cell=new.cell)
        return text, source.added(new)
    return rng.choice(REMOVE_INSTRUCTIONS).format(ref=ref), source.removed(target.cell)


def _edit(rng: random.Random, scenes: _Scenes, subtype: str | None = None) -> Example:
    op = subtype or rng.choice(EDIT_OPS)
    source = _edit_source(scenes, op)
    instruction, edited = _edit_instruction(rng, source, op, it=False)
    return Example("edit", SYSTEM_EDITING, (
        _user(ScenePart(source), TextPart(instruction)), _assistant(ScenePart(edited)),
    ), op)


def _multiturn(rng: random.Random, scenes: _Scenes, subtype: str | None = None) -> Example:
    op = subtype or rng.choice(EDIT_OPS)
    first = _edit_source(scenes, op)
    request = rng.choice(T2I_PROMPTS).format(desc=_loose_description(rng, first))
    instruction, second = _edit_instruction(rng, first, op, it=True)
    return Example("multiturn", SYSTEM_T2I, (
        _user(TextPart(request)), _assistant(ScenePart(first)),
        _user(TextPart(FOLLOW_UP_PREFIX + instruction)), _assistant(ScenePart(second)),
    ), op)


# ---- stories -------------------------------------------------------------------------------------------

STORY_PROMPTS = (
    "tell a story in {n} frames about {thing}.", "make a picture story of {n} frames about {thing}.",
    "show {n} frames of a story with {thing}.", "draw a story in {n} pictures about {thing}.",
)
MOVING_STORY_PROMPTS = (
    "tell a story in {n} frames where {thing} moves around.", "show {thing} moving in {n} frames.",
)
STORY_OPENING = "first, there is {desc}."
STORY_STEP = "then {event}."
STORY_LAST_STEP = "finally {event}."
MOVE_EVENT = "the {color} {shape} moves {direction} to the {cell}"
RECOLOR_EVENT = "the {color} {shape} turns {new}"
APPEAR_EVENT = "{thing} appears at the {cell}"


def narrate_change(before: Scene, after: Scene) -> str | None:
    """Return the story event that turns `before` into `after`, or None when it is not one event.

    An event is one shape moving to a neighbouring cell, one shape turning another colour (named by its old
    colour and kind, which must be unique), or one new shape appearing.
    """
    gone = [s for s in before.shapes if s not in after.shapes]
    new = [s for s in after.shapes if s not in before.shapes]
    if not gone and len(new) == 1:
        return APPEAR_EVENT.format(thing=_thing(new[0].shape, new[0].color), cell=new[0].cell)
    if len(gone) != 1 or len(new) != 1:
        return None
    old, now = gone[0], new[0]
    if sum(s.shape == old.shape and s.color == old.color for s in before.shapes) != 1:
        return None
    if old.cell == now.cell and old.shape == now.shape:
        return RECOLOR_EVENT.format(color=old.color, shape=old.shape, new=now.color)
    if (old.shape, old.color) != (now.shape, now.color):
        return None
    (r0, c0), (r1, c1) = cell_position(old.cell), cell_position(now.cell)
    direction = next((d for d, step in DIRECTIONS.items() if step == (r1 - r0, c1 - c0)), None)
    if direction is None:
        return None
    return MOVE_EVENT.format(color=old.color, shape=old.shape, direction=direction, cell=now.cell)


def narrate_story(scenes: Sequence[Scene]) -> list[str] | None:
    """Return the text of each frame of a story showing `scenes`, or None when a step is not one event."""
    texts = [STORY_OPENING.format(desc=describe(scenes[0]))]
    for k in range(1, len(scenes)):
        event = narrate_change(scenes[k - 1], scenes[k])
        if event is None:
            return None
        texts.append((STORY_LAST_STEP if k == len(scenes) - 1 else STORY_STEP).format(event=event))
    return texts


def check_story(frames: Sequence[tuple[str, Scene]]) -> bool:
    """Return whether each frame's text tells exactly what changed from the previous frame's scene."""
    if not frames:
        return False
    texts = narrate_story([scene for _, scene in frames])
    return texts is not None and texts == [text for text, _ in frames]


def _story_step(rng: random.Random, scene: Scene, hero: Shape, came_from: str | None,
                moving_only: bool) -> tuple[Scene, Shape]:
    """One story event around `hero`; returns the new scene and the hero's new state."""
    row, col = cell_position(hero.cell)
    steps = [cell_at(row + dr, col + dc) for dr, dc in DIRECTIONS.values()]
    free = [c for c in steps if c is not None and scene.at(c) is None]
    forward = [c for c in free if c != came_from] or free
    events = ["move", "move"] if forward else []
    if not moving_only:
        events.append("recolor")
        if len(scene) < MAX_SHAPES:
            events.append("appear")
    event = rng.choice(events or ["recolor"])
    if event == "move":
        cell = rng.choice(forward)
        return scene.moved(hero.cell, cell), Shape(hero.shape, hero.color, cell)
    if event == "recolor":
        taken = {s.color for s in scene.shapes if s.shape == hero.shape}
        color = rng.choice([c for c in COLORS if c not in taken])
        return scene.recolored(hero.cell, color), Shape(hero.shape, color, hero.cell)
    others = [(sh, co) for sh in SHAPES for co in COLORS if (sh, co) != (hero.shape, hero.color)]
    shape, color = rng.choice(others)
    return scene.added(Shape(shape, color, rng.choice(scene.empty_cells()))), hero


def _story(rng: random.Random, scenes: _Scenes) -> Example:
    n_frames = rng.randint(2, 4)
    moving_only = rng.random() < 0.5
    first = scenes.draw(max_shapes=2)
    unique = [s for s in first.shapes if sum((o.shape, o.color) == (s.shape, s.color) for o in first) == 1]
    if not unique:  # two shapes of the same kind and colour: repaint one so the hero can be named
        first = first.recolored(first.shapes[0].cell, rng.choice([c for c in COLORS
                                                                  if c != first.shapes[0].color]))
        unique = list(first.shapes)
    hero = start = rng.choice(unique)
    frames, came_from = [first], None
    for _ in range(n_frames - 1):
        scene, moved = _story_step(rng, frames[-1], hero, came_from, moving_only)
        if moved.cell != hero.cell:
            came_from = hero.cell
        hero = moved
        frames.append(scene)
    texts = narrate_story(frames)
    if texts is None:
        raise TaskError(f"story generator produced a step that is not one event: {frames}")
    prompts = MOVING_STORY_PROMPTS if moving_only else STORY_PROMPTS
    prompt = rng.choice(prompts).format(n=_count_word(n_frames), thing=_thing(start.shape, start.color))
    parts: list[Part] = []
    for text, scene in zip(texts, frames):
        parts += [TextPart(text), ScenePart(scene)]
    return Example("story", SYSTEM_INTERLEAVED, (_user(TextPart(prompt)), _assistant(*parts)),
                   "move" if moving_only else "mixed")


# ---- sampling ------------------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[..., Example]] = {
    "caption": _caption, "qa": _qa, "t2i": _t2i, "riddle_thinking": _riddle_thinking,
    "riddle_direct": _riddle_direct, "edit": _edit, "multiturn": _multiturn, "story": _story,
    "qa_followup": _qa_followup,
}
# The kinds of example a family can be asked for alone (`sample_example(..., subtype=)`).
SUBTYPES: dict[str, tuple[str, ...]] = {"qa": QA_SUBTYPES, "qa_followup": QA_SUBTYPES, "edit": EDIT_OPS,
                                        "multiturn": EDIT_OPS}
# What a mixture may weigh: a family, or "family/subtype" for one kind of it alone.
_MIXTURE_KEYS = frozenset(FAMILIES) | {f"{family}/{kind}" for family, kinds in SUBTYPES.items() for kind in kinds}
_MAX_DRAWS = 1000


def sample_example(family: str, rng: random.Random, holdout: str = "exclude", subtype: str | None = None) -> Example:
    """Return one example of `family`, deterministic given the state of `rng`.

    holdout: "exclude" (training data: no held-out scene, riddle or text anywhere in the example), "only"
    (every example is held out: for evaluating compositional generalisation), or "any" (no filter).
    subtype: only examples of this kind (`SUBTYPES`: a question's kind, an edit's operation); None draws the
    kind too.
    """
    if family not in _GENERATORS:
        raise TaskError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    if holdout not in HOLDOUT_MODES:
        raise TaskError(f"unknown holdout mode {holdout!r}; expected one of {HOLDOUT_MODES}")
    if subtype is not None and subtype not in SUBTYPES.get(family, ()):
        raise TaskError(f"{family!r} has no subtype {subtype!r}; it has {SUBTYPES.get(family, ())}")
    generate = _GENERATORS[family] if subtype is None else partial(_GENERATORS[family], subtype=subtype)
    for _ in range(_MAX_DRAWS):
        example = generate(rng, _Scenes(rng, holdout))
        if holdout == "any" or is_holdout_example(example) == (holdout == "only"):
            return example
    raise TaskError(f"no {family!r} example met holdout={holdout!r} in {_MAX_DRAWS} draws")


def sample_mixture(rng: random.Random, weights: Mapping[str, float] | None = None,
                   holdout: str = "exclude") -> Example:
    """Return one example of a family drawn in proportion to `weights` (DEFAULT_WEIGHTS when None).

    A key "family/subtype" (such as "qa/yes_no") weighs examples of that kind alone, on top of what the
    family's own key draws of every kind.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = sorted(set(weights) - _MIXTURE_KEYS)
    if unknown:
        raise TaskError(f"unknown task families in weights: {unknown}; expected some of {FAMILIES}, or "
                        f"family/subtype for {sorted(SUBTYPES)}")
    # Families first, in their fixed order, so a mixture without subtype keys draws as it always has.
    keys = [f for f in FAMILIES if weights.get(f, 0.0) > 0.0] + sorted(k for k in weights
                                                                       if "/" in k and weights[k] > 0.0)
    if not keys or any(w < 0 for w in weights.values()):
        raise TaskError(f"weights must be non-negative with at least one positive, got {dict(weights)}")
    family, _, subtype = rng.choices(keys, weights=[weights[k] for k in keys])[0].partition("/")
    return sample_example(family, rng, holdout, subtype or None)


# ---- vocabulary ----------------------------------------------------------------------------------------

# Words the generators write outside the templates above (articles, joins, plan and answer words).
_GLUE = "a an and , . ; ? at in the that shape one is so yes no"


def vocabulary() -> set[str]:
    """Return every word and punctuation mark any generator can emit, system prompts included.

    Words are as `split_words` cuts them; template slots ("{ref}") are not words.
    """
    sources: list[str] = [
        SYSTEM_T2I, SYSTEM_THINKING, SYSTEM_UNDERSTANDING, SYSTEM_EDITING, SYSTEM_INTERLEAVED, _GLUE,
        FOLLOW_UP_PREFIX, OPPOSITE_CLUE, COUNT_RIDDLE_PHRASE, COUNT_RIDDLE_CLUED_PHRASE,
        STORY_OPENING, STORY_STEP, STORY_LAST_STEP, MOVE_EVENT, RECOLOR_EVENT, APPEAR_EVENT,
        *SHAPES, *COLORS, *CELLS, *NUMBER_WORDS, *PLURALS.values(), *DIRECTIONS, *ROWS,
        *CAPTION_PROMPTS, *COLOR_QUESTIONS, *SHAPE_QUESTIONS, *POSITION_QUESTIONS, *COUNT_ALL_QUESTIONS,
        *COUNT_SHAPE_QUESTIONS, *COUNT_COLOR_QUESTIONS, *EXISTS_QUESTIONS, *OCCUPIED_QUESTIONS,
        *EMPTY_QUESTIONS, *IS_COLOR_QUESTIONS, *IS_SHAPE_QUESTIONS, *T2I_PROMPTS, *RIDDLE_PROMPTS,
        *CELL_RELATIONS, *RECOLOR_INSTRUCTIONS, *MOVE_INSTRUCTIONS, *ADD_INSTRUCTIONS, *REMOVE_INSTRUCTIONS,
        *STORY_PROMPTS, *MOVING_STORY_PROMPTS,
        *(text for clues in SHAPE_CLUES.values() for pair in clues for text in pair),
        *(clue for clues in COLOR_CLUES.values() for clue in clues),
        *(clue for clues in COUNT_CLUES.values() for clue in clues),
        "it",
    ]
    words: set[str] = set()
    for text in sources:
        words.update(split_words(re.sub(r"\{\w+\}", " ", text)))
    return words
