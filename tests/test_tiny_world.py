"""The tiny shapes world: scenes, renderer, pixel reader, and the task generators built on them."""

from __future__ import annotations

import io
import itertools
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from runtime.errors import RuntimeErrorBase
from runtime.tiny.tasks import (
    CAPTION_PROMPTS,
    COLOR_CLUES,
    COUNT_CLUES,
    FAMILIES,
    HOLDOUT_PURPLE_TRIANGLE,
    HOLDOUT_RIDDLE_ORANGE_SQUARE,
    NUMBER_WORDS,
    PLURALS,
    QA_SUBTYPES,
    SHAPE_CLUES,
    SYSTEM_EDITING,
    SYSTEM_INTERLEAVED,
    SYSTEM_T2I,
    SYSTEM_THINKING,
    SYSTEM_UNDERSTANDING,
    Example,
    ScenePart,
    TaskError,
    TextPart,
    ThinkPart,
    Turn,
    check_story,
    holdout_kinds,
    is_holdout_example,
    sample_example,
    sample_mixture,
    split_words,
    vocabulary,
)
from runtime.tiny.world import (
    CELLS,
    COLORS,
    PALETTE,
    SHAPES,
    Scene,
    SceneError,
    SceneReadError,
    Shape,
    cell_at,
    cell_position,
    describe,
    is_holdout_scene,
    opposite,
    parse_description,
    read_scene,
    read_shapes,
    render,
    same_scene_described,
    sample_scene,
)


def random_scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def samples(family: str, holdout: str = "exclude", n: int = 150, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [sample_example(family, rng, holdout) for _ in range(n)]


# ---- scenes --------------------------------------------------------------------------------------------

def test_scene_equality_ignores_the_order_shapes_are_given_in():
    a, b = Shape("circle", "red", "bottom"), Shape("square", "blue", "top-left")
    assert Scene.of(a, b) == Scene.of(b, a)
    assert Scene.of(a, b).shapes == (b, a)  # grid order: top-left comes first


@pytest.mark.parametrize("shapes", [
    (),
    (Shape("circle", "red", "top"), Shape("square", "blue", "top")),
    tuple(Shape("circle", "red", c) for c in CELLS[:4]),
])
def test_scene_rejects_empty_crowded_or_shared_cells(shapes):
    with pytest.raises(SceneError):
        Scene(shapes)


@pytest.mark.parametrize("fields", [("hexagon", "red", "top"), ("circle", "pink", "top"), ("circle", "red", "up")])
def test_shape_rejects_unknown_names_with_a_typed_error(fields):
    with pytest.raises(SceneError) as err:
        Shape(*fields)
    assert isinstance(err.value, RuntimeErrorBase)


def test_describe_lists_shapes_in_grid_order_with_articles():
    scene = Scene.of(Shape("triangle", "blue", "bottom"), Shape("circle", "red", "top-left"),
                     Shape("square", "orange", "center"))
    assert describe(scene) == ("a red circle at the top-left, an orange square at the center "
                               "and a blue triangle at the bottom")


def test_parse_description_inverts_describe_and_reads_the_for_a():
    for scene in random_scenes(3, 300):
        assert parse_description(describe(scene)) == scene
        assert parse_description(describe(scene) + ".") == scene
    assert parse_description("the blue circle at the center.") == Scene.of(Shape("circle", "blue", "center"))
    assert same_scene_described("so the red square at the top and a blue circle at the left".removeprefix("so "),
                                "a blue circle at the left and a red square at the top.")


@pytest.mark.parametrize("text", ["blue", "", "a blue circle at the middle", "a blue blue at the center",
                                  "a red circle at the top and a blue square at the top",
                                  "a red circle at the top, and a blue square at the left"])
def test_parse_description_refuses_what_is_not_a_scene_with_a_typed_error(text):
    with pytest.raises(SceneError):
        parse_description(text)
    assert not same_scene_described(text, text)


def test_grid_geometry_helpers_agree_with_cell_names():
    assert cell_position("top-right") == (0, 2)
    assert cell_at(2, 0) == "bottom-left"
    assert cell_at(3, 0) is None
    assert opposite("top-right") == "bottom-left"
    assert opposite("top") == "bottom"
    assert opposite("center") is None


def test_sample_scene_honours_count_included_shapes_and_filter():
    rng = random.Random(3)
    fixed = Shape("triangle", "purple", "center")
    for _ in range(50):
        scene = sample_scene(rng, n_shapes=2, include=[fixed])
        assert len(scene) == 2 and fixed in scene.shapes
        assert not is_holdout_scene(sample_scene(rng, allow=lambda s: not is_holdout_scene(s)))


def test_sample_scene_is_deterministic_given_a_seed():
    assert random_scenes(7, 20) == random_scenes(7, 20)
    assert random_scenes(7, 20) != random_scenes(8, 20)


def test_holdout_scene_is_one_holding_a_purple_triangle():
    assert is_holdout_scene(Scene.of(Shape("triangle", "purple", "top"), Shape("circle", "red", "left")))
    assert not is_holdout_scene(Scene.of(Shape("triangle", "blue", "top"), Shape("circle", "purple", "left")))


# ---- render and read -----------------------------------------------------------------------------------

def test_render_is_deterministic_at_the_requested_size():
    scene = random_scenes(1, 1)[0]
    for size in (32, 64, 256):
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(render(scene, size)))


def test_render_paints_only_white_and_palette_colours():
    scene = Scene.of(*(Shape(SHAPES[k % 3], COLORS[k], CELLS[2 * k]) for k in range(3)))
    pixels = {tuple(p) for p in np.asarray(render(scene, 97)).reshape(-1, 3)}
    assert pixels == {(255, 255, 255)} | {PALETTE[c] for c in COLORS[:3]}


def test_palette_colours_are_far_apart():
    values = np.array([PALETTE[c] for c in COLORS], dtype=float)
    distances = np.linalg.norm(values[:, None] - values[None], axis=-1)
    assert distances[~np.eye(len(COLORS), dtype=bool)].min() >= 100


def test_every_single_shape_reads_back_at_the_smallest_size():
    for shape in SHAPES:
        for color in COLORS:
            for cell in CELLS:
                scene = Scene.of(Shape(shape, color, cell))
                assert read_scene(render(scene, 32)) == scene


@pytest.mark.parametrize("size", [32, 64, 128])
def test_random_scenes_read_back_exactly(size):
    for scene in random_scenes(size, 60):
        assert read_scene(render(scene, size)) == scene


def test_odd_sizes_read_back_exactly():
    scenes = random_scenes(5, 10)
    for size in (33, 47, 50, 100, 255):
        assert [read_scene(render(s, size)) for s in scenes] == scenes


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _noise(image: Image.Image, sigma: float) -> Image.Image:
    pixels = np.asarray(image, dtype=float) + np.random.default_rng(0).normal(0, sigma, (image.height,
                                                                                         image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tint(image: Image.Image, gain: tuple[float, ...], offset: tuple[float, ...]) -> Image.Image:
    pixels = np.asarray(image, dtype=float) * np.array(gain) + np.array(offset)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


DISTORTIONS = {
    "gaussian blur 1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "gaussian blur 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "gaussian noise 20": lambda im: _noise(im, 20),
    "jpeg quality 30": lambda im: _jpeg(im, 30),
    "colour shift": lambda im: _tint(im, (0.9, 1.0, 0.95), (0, 15, 10)),
    "darker": lambda im: _tint(im, (0.8, 0.8, 0.8), (0, 0, 0)),
    "blur, tint, noise and jpeg": lambda im: _jpeg(_noise(_tint(im.filter(ImageFilter.GaussianBlur(1)),
                                                                (0.9, 1.0, 0.95), (0, 15, 10)), 8), 60),
}


@pytest.mark.parametrize("name", sorted(DISTORTIONS))
def test_reading_survives_mild_distortion_at_64_pixels(name):
    for scene in random_scenes(11, 40):
        assert read_scene(DISTORTIONS[name](render(scene, 64))) == scene


def test_reading_survives_downscaling_a_large_render():
    for scene in random_scenes(12, 20):
        assert read_scene(render(scene, 256).resize((64, 64), Image.BICUBIC)) == scene


def test_reading_tolerates_slight_noise_at_32_pixels():
    for scene in random_scenes(13, 30):
        assert read_scene(_noise(render(scene, 32), 12)) == scene


def test_grey_marks_are_not_shapes():
    image = render(Scene.of(Shape("circle", "red", "center")), 64)
    pixels = np.asarray(image).copy()
    pixels[2:18, 2:18] = 90  # a dark grey blot in the top-left cell
    assert read_shapes(Image.fromarray(pixels)) == (Shape("circle", "red", "center"),)


def test_a_blank_canvas_is_not_a_scene():
    blank = Image.new("RGB", (64, 64), "white")
    assert read_shapes(blank) == ()
    with pytest.raises(SceneReadError):
        read_scene(blank)


def test_reading_something_other_than_a_picture_is_a_typed_error():
    with pytest.raises(SceneReadError):
        read_scene(np.zeros((64, 64, 3)))


# ---- task families: structure --------------------------------------------------------------------------

SYSTEMS = {
    "caption": SYSTEM_UNDERSTANDING, "qa": SYSTEM_UNDERSTANDING, "t2i": SYSTEM_T2I,
    "riddle_thinking": SYSTEM_THINKING, "riddle_direct": SYSTEM_T2I, "edit": SYSTEM_EDITING,
    "multiturn": SYSTEM_T2I, "story": SYSTEM_INTERLEAVED, "qa_followup": SYSTEM_UNDERSTANDING,
}
TARGET_KINDS = {
    "caption": [TextPart], "qa": [TextPart], "t2i": [ScenePart], "riddle_thinking": [ThinkPart, ScenePart],
    "riddle_direct": [ScenePart], "edit": [ScenePart], "multiturn": [ScenePart], "qa_followup": [TextPart],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_alternates_user_and_assistant_and_ends_with_the_target(family):
    for example in samples(family, n=60):
        assert example.family == family and example.system == SYSTEMS[family]
        assert [t.role for t in example.turns] == ["user", "assistant"] * (len(example.turns) // 2)
        kinds = [type(p) for p in example.target.parts]
        if family == "story":
            assert kinds == [TextPart, ScenePart] * (len(kinds) // 2) and 2 <= len(kinds) // 2 <= 4
        else:
            assert kinds == TARGET_KINDS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_given_a_seed(family):
    assert samples(family, n=20, seed=5) == samples(family, n=20, seed=5)
    assert samples(family, n=20, seed=5) != samples(family, n=20, seed=6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_several_phrasings(family):
    prompts = {" ".join(example.turns[-2].parts[-1].text.split()[:2]) for example in samples(family, n=100)}
    assert len(prompts) >= 3


def test_every_emitted_word_is_in_the_vocabulary():
    words = vocabulary()
    rng = random.Random(9)
    for _ in range(1500):
        example = sample_mixture(rng, holdout="any")
        for text in (example.system, *example.texts()):
            assert set(split_words(text)) <= words, text


def test_vocabulary_is_small_and_lower_case_apart_from_system_prompts():
    words = vocabulary()
    assert len(words) < 250
    assert {w for w in words if w != w.lower()} == {"You"}


# ---- task families: answers follow from the scenes ----------------------------------------------------

def test_caption_answer_is_the_canonical_description():
    for example in samples("caption"):
        (scene,) = example.scenes()
        assert example.target.parts[0].text == describe(scene)


def _resolve(scene: Scene, ref: str) -> Shape:
    """The one shape a referring phrase of the generators picks out."""
    if m := re.fullmatch(r"the (?:shape|one) at the (\S+)", ref):
        matches = [scene.at(m[1])]
    elif m := re.fullmatch(r"the (\w+) (shape|one)", ref):
        matches = [s for s in scene.shapes if s.color == m[1]]
    elif m := re.fullmatch(r"the (\w+) (\w+)", ref):
        matches = [s for s in scene.shapes if (s.color, s.shape) == (m[1], m[2])]
    else:
        matches = [s for s in scene.shapes if f"the {s.shape}" == ref]
    assert len(matches) == 1 and matches[0] is not None, (ref, scene)
    return matches[0]


def _expected_answer(scene: Scene, question: str) -> str:
    """An independent reading of each question template."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    count = lambda n: NUMBER_WORDS[n]
    patterns = [
        (r"(?:what color is|which color does|what is the color of) (.+?)(?: have)?\?",
         lambda m: _resolve(scene, m[1]).color),
        (r"(?:what shape is|which shape is|what kind of shape is) (.+)\?", lambda m: _resolve(scene, m[1]).shape),
        (r"(?:where is|in which part of the image is|which cell holds) (.+)\?",
         lambda m: _resolve(scene, m[1]).cell),
        (r"(?:how many shapes are there|how many shapes are in the image)\?|count the shapes\.",
         lambda m: count(len(scene))),
        (r"how many (\w+) (?:are there|do you see)\?",
         lambda m: count(sum(PLURALS[s.shape] == m[1] for s in scene.shapes))),
        (r"how many (\w+) shapes are there\?|how many shapes are (\w+)\?",
         lambda m: count(sum(s.color in (m[1], m[2]) for s in scene.shapes))),
        (r"(?:is there|do you see) an? (\w+) (\w+)(?: in the image)?\?",
         lambda m: yes(any((s.color, s.shape) == (m[1], m[2]) for s in scene.shapes))),
        (r"(?:is there a shape at|is anything at) the (\S+)\?", lambda m: yes(scene.at(m[1]) is not None)),
        (r"is the (\S+) empty\?", lambda m: yes(scene.at(m[1]) is None)),
        (r"is the shape at the (\S+) a (\w+)\?", lambda m: yes(scene.at(m[1]).shape == m[2])),
        (r"is the shape at the (\S+) (\w+)\?", lambda m: yes(scene.at(m[1]).color == m[2])),
    ]
    for pattern, answer in patterns:
        if m := re.fullmatch(pattern, question):
            return answer(m)
    raise AssertionError(f"no template matches {question!r}")


def test_every_qa_answer_is_computed_from_the_scene():
    examples = samples("qa", n=600)
    assert {e.subtype for e in examples} == {"color", "shape", "position", "count", "yes_no"}
    for example in examples:
        (scene,) = example.scenes()
        question = example.turns[0].parts[1].text
        assert example.target.parts[0].text == _expected_answer(scene, question)


def test_a_question_focuses_on_the_cells_that_decide_its_answer():
    for example in samples("qa", n=600):
        (scene,) = example.scenes()
        question, answer = example.turns[0].parts[1].text, example.target.parts[0].text
        focus = example.focus
        if example.subtype in ("color", "shape", "position"):
            (cell,) = focus
            assert answer in (scene.at(cell).color, scene.at(cell).shape, cell), (question, focus)
        elif example.subtype == "count":
            assert NUMBER_WORDS[len(focus)] == answer and all(scene.at(cell) for cell in focus), question
        elif m := re.search(r"at the ([\w-]+)|is the (\S+) empty\?$", question):
            assert focus == (m[1] or m[2],), question
        else:  # is there a <thing>? — the cells holding it, none when the answer is no
            assert (len(focus) > 0) == (answer == "yes") and all(scene.at(cell) for cell in focus), question
    assert all(not e.focus for family in ("caption", "t2i", "edit") for e in samples(family, n=20))


def test_a_follow_up_question_is_about_the_picture_of_the_first_turn():
    examples = samples("qa_followup", n=300)
    assert {e.subtype for e in examples} == {"color", "shape", "position", "count", "yes_no"}
    shown_again = 0
    for example in examples:
        first, earlier_answer, second, answer = example.turns
        (scene,) = [p.scene for p in first.parts if isinstance(p, ScenePart)]
        assert all(p.scene == scene for p in second.parts if isinstance(p, ScenePart))
        shown_again += any(isinstance(p, ScenePart) for p in second.parts)
        earlier = first.parts[-1].text
        # The earlier exchange is right about the same picture: a caption, or another answered question.
        assert earlier_answer.parts[0].text == (describe(scene) if earlier in CAPTION_PROMPTS
                                                else _expected_answer(scene, earlier))
        assert answer.parts[0].text == _expected_answer(scene, second.parts[-1].text)
    assert 0.3 < shown_again / len(examples) < 0.7


def test_count_answers_equal_the_number_of_shapes():
    for example in samples("qa", n=600):
        question = example.turns[0].parts[1].text
        if question.startswith(("how many shapes are there", "how many shapes are in", "count the shapes")):
            assert example.target.parts[0].text == NUMBER_WORDS[len(example.scenes()[0])]


def test_yes_no_answers_are_balanced():
    answers = [e.target.parts[0].text for e in samples("qa", n=800) if e.subtype == "yes_no"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_text_to_image_prompt_names_every_shape_of_the_target():
    for example in samples("t2i"):
        prompt = example.turns[0].parts[0].text
        for shape in example.target.parts[0].scene.shapes:
            assert re.search(rf"\b{shape.color} {shape.shape} (?:at|in) the {shape.cell}\b", prompt), prompt


@pytest.mark.parametrize("family", ["riddle_thinking", "riddle_direct"])
def test_riddle_clues_resolve_to_the_answer_scene(family):
    for example in samples(family, n=300):
        riddle = example.turns[0].parts[0].text
        answer = example.target.parts[-1].scene
        clued = False
        for shape, clues in SHAPE_CLUES.items():
            for clue, _ in clues:
                if f"that {clue}" in riddle:
                    clued = True
                    assert {s.shape for s in answer} == {shape}, riddle
        for color, clues in COLOR_CLUES.items():
            for clue in clues:
                if f"in {clue}" in riddle:
                    clued = True
                    assert {s.color for s in answer} == {color}, riddle
        for n, clues in COUNT_CLUES.items():
            if any(f"as many as {clue}" in riddle for clue in clues):
                clued = True
                assert len(answer) == n, riddle
        if m := re.search(r"opposite the (\S+?)[.?]", riddle):
            clued = True
            assert answer.cells == (opposite(m[1]),), riddle
        if m := re.search(r"just (above|below|left of|right of) the (\S+?)[.?]", riddle):
            clued = True
            row, col = cell_position(m[2])
            step = {"above": (-1, 0), "below": (1, 0), "left of": (0, -1), "right of": (0, 1)}[m[1]]
            assert answer.cells == (cell_at(row + step[0], col + step[1]),), riddle
        assert clued, riddle


def test_thinking_plan_resolves_each_clue_then_describes_the_answer():
    for example in samples("riddle_thinking", n=200):
        plan, picture = example.target.parts
        clauses = plan.text.removesuffix(".").split("; ")
        assert clauses[-1] == f"so {describe(picture.scene)}"
        assert len(clauses) >= 2 and all(re.search(r" (?:is|means) ", c) for c in clauses[:-1])


def test_direct_riddles_ask_the_same_riddles_without_a_plan():
    thinking = {e.turns[0].parts[0].text for e in samples("riddle_thinking", n=300)}
    direct = {e.turns[0].parts[0].text for e in samples("riddle_direct", n=300)}
    assert len(thinking & direct) > 10


def _edit_is_consistent(op: str, before: Scene, after: Scene, instruction: str) -> bool:
    gone = [s for s in before.shapes if s not in after.shapes]
    new = [s for s in after.shapes if s not in before.shapes]
    if op == "recolor":
        return (len(gone) == len(new) == 1 and gone[0].cell == new[0].cell and gone[0].shape == new[0].shape
                and new[0].color in instruction.split(" ")[-1])
    if op == "move":
        return (len(gone) == len(new) == 1 and (gone[0].shape, gone[0].color) == (new[0].shape, new[0].color)
                and instruction.endswith(f"the {new[0].cell}."))
    if op == "add":
        return not gone and len(new) == 1 and f"{new[0].color} {new[0].shape}" in instruction
    return len(gone) == 1 and not new


def test_edits_change_exactly_what_the_instruction_says():
    examples = samples("edit", n=300)
    assert {e.subtype for e in examples} == {"recolor", "move", "add", "remove"}
    for example in examples:
        before, after = example.scenes()
        instruction = example.turns[0].parts[1].text
        assert _edit_is_consistent(example.subtype, before, after, instruction), (instruction, before, after)


def test_multiturn_follow_up_edits_the_earlier_image():
    for example in samples("multiturn", n=300):
        first, second = example.scenes()
        follow_up = example.turns[2].parts[0].text
        assert follow_up.startswith("now ")
        assert (" it " in f" {follow_up} ") <= (len(first) == 1)
        assert _edit_is_consistent(example.subtype, first, second, follow_up.removeprefix("now "))


def test_multiturn_refers_to_a_lone_shape_as_it():
    follow_ups = [e.turns[2].parts[0].text for e in samples("multiturn", n=300)]
    assert any(re.search(r"\bit\b", f) for f in follow_ups)


def _frames(example: Example) -> list[tuple[str, Scene]]:
    parts = example.target.parts
    return [(parts[k].text, parts[k + 1].scene) for k in range(0, len(parts), 2)]


def test_story_frames_tell_what_the_pictures_show():
    for example in samples("story", n=200):
        frames = _frames(example)
        assert check_story(frames)
        assert frames[0][0] == f"first, there is {describe(frames[0][1])}."
        assert f" {NUMBER_WORDS[len(frames)]} " in example.turns[0].parts[0].text


def test_story_motion_matches_the_scenes():
    moves = 0
    for example in samples("story", n=200):
        frames = _frames(example)
        for (_, before), (text, after) in itertools.pairwise(frames):
            m = re.fullmatch(r"(?:then|finally) the (\w+) (\w+) moves (\w+) to the (\S+)\.", text)
            if not m:
                assert example.subtype == "mixed", text
                continue
            moves += 1
            (mover,) = [s for s in before.shapes if (s.color, s.shape) == (m[1], m[2])]
            drow, dcol = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[m[3]]
            row, col = cell_position(mover.cell)
            assert cell_at(row + drow, col + dcol) == m[4]
            assert after == before.moved(mover.cell, m[4])
    assert moves > 100


def test_check_story_rejects_a_frame_that_contradicts_its_picture():
    start = Scene.of(Shape("circle", "red", "left"))
    moved = Scene.of(Shape("circle", "red", "center"))
    assert check_story([("first, there is a red circle at the left.", start),
                        ("finally the red circle moves right to the center.", moved)])
    assert not check_story([("first, there is a red circle at the left.", start),
                            ("finally the red circle moves left to the center.", moved)])
    assert not check_story([("first, there is a red circle at the left.", start),
                            ("finally the red circle moves right to the center.", start)])


# ---- holdout -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_training_data_never_holds_a_held_out_item(family):
    for example in samples(family, "exclude", n=300):
        assert not any(is_holdout_scene(s) for s in example.scenes())
        assert not any("purple triangle" in t for t in example.texts())
        if family.startswith("riddle"):
            assert Shape("square", "orange", "bottom-right") not in example.target.parts[-1].scene.shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_holdout_only_yields_held_out_examples(family):
    assert all(is_holdout_example(e) for e in samples(family, "only", n=100))


def test_held_out_riddles_cover_both_groups():
    kinds = [holdout_kinds(e) for e in samples("riddle_direct", "only", n=100)]
    assert any(HOLDOUT_PURPLE_TRIANGLE in k for k in kinds)
    assert any(HOLDOUT_RIDDLE_ORANGE_SQUARE in k for k in kinds)


def test_orange_square_bottom_right_is_held_out_only_for_riddles():
    turns = (Turn("user", (TextPart("draw an orange square at the bottom-right."),)),
             Turn("assistant", (ScenePart(Scene.of(Shape("square", "orange", "bottom-right"))),)))
    as_t2i = Example("t2i", SYSTEM_T2I, turns)
    as_riddle = Example("riddle_direct", SYSTEM_T2I, turns)
    assert not is_holdout_example(as_t2i)
    assert holdout_kinds(as_riddle) == {HOLDOUT_RIDDLE_ORANGE_SQUARE}


# ---- mixtures and bad requests -------------------------------------------------------------------------

def test_mixture_follows_the_weights():
    rng = random.Random(4)
    families = [sample_mixture(rng, {"qa": 3.0, "story": 1.0, "edit": 0.0}).family for _ in range(400)]
    assert set(families) == {"qa", "story"}
    assert 0.65 < families.count("qa") / len(families) < 0.85


def test_a_subtype_key_adds_examples_of_that_kind_on_top_of_the_family():
    rng = random.Random(5)
    drawn = [sample_mixture(rng, {"qa": 1.0, "qa/yes_no": 1.0, "t2i": 1.0}) for _ in range(600)]
    questions = [e for e in drawn if e.family == "qa"]
    # Half the questions come from the subtype key, a fifth of the rest from the family's own draw.
    assert 0.5 < sum(e.subtype == "yes_no" for e in questions) / len(questions) < 0.7
    assert {e.subtype for e in questions} == set(QA_SUBTYPES)
    assert all(e.subtype == "count" for e in (sample_example("qa_followup", rng, subtype="count") for _ in range(20)))


@pytest.mark.parametrize("family", ["edit", "multiturn"])
def test_an_edit_family_can_be_asked_for_one_operation(family):
    rng = random.Random(6)
    for _ in range(20):
        example = sample_example(family, rng, subtype="remove")
        before, after = example.scenes()[0], example.scenes()[-1]
        instruction = example.texts()[-1].removeprefix("now ")
        assert example.subtype == "remove" and len(after) == len(before) - 1
        assert _edit_is_consistent("remove", before, after, instruction), (instruction, before, after)


@pytest.mark.parametrize("call", [
    lambda rng: sample_example("poetry", rng),
    lambda rng: sample_example("t2i", rng, subtype="yes_no"),
    lambda rng: sample_example("qa", rng, subtype="poetry"),
    lambda rng: sample_mixture(rng, {"qa/poetry": 1.0}),
    lambda rng: sample_mixture(rng, {"t2i/yes_no": 1.0}),
    lambda rng: sample_example("edit", rng, subtype="yes_no"),
    lambda rng: sample_example("qa", rng, holdout="some"),
    lambda rng: sample_mixture(rng, {"poetry": 1.0}),
    lambda rng: sample_mixture(rng, {"qa": 0.0}),
    lambda rng: sample_mixture(rng, {"qa": -1.0, "t2i": 1.0}),
])
def test_bad_task_requests_raise_a_typed_error(call):
    with pytest.raises(TaskError):
        call(random.Random(0))
