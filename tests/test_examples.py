"""The example agents, each run as a user runs it (its own process, default arguments) on the bundled tiny
model: they finish, write what they say they write, and what they drew is right."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from runtime.tiny.world import Scene, Shape, parse_description, read_scene

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, cwd: Path, stdin: str | None = None) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, input=stdin,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_visual_chat_answers_about_an_attached_scene_from_its_cache(tmp_path):
    printed = run("visual_chat.py", cwd=tmp_path, stdin="/scene\nhow many shapes are there?\n"
                                                        "how many shapes are in the image?\n/quit\n")
    shown = parse_description(printed.split("(it shows ", 1)[1].split(")", 1)[0])
    answers = [line.removeprefix("you> ").removeprefix("model> ") for line in printed.splitlines()
               if "model> " in line]
    assert answers == [["one", "two", "three"][len(shown) - 1]] * 2, printed
    assert "0 from cache" in printed and "32 from cache" in printed  # the second turn reuses the first


def test_the_think_draw_critic_accepts_a_right_drawing_at_once(tmp_path):
    printed = run("think_draw_critic.py", "--out", str(tmp_path), cwd=tmp_path)
    assert "1 attempt(s), accepted: True" in printed, printed
    assert read_scene(Image.open(tmp_path / "think_draw.png")) == Scene.of(Shape("circle", "blue", "center"))


def test_the_story_writer_writes_a_page_with_every_frame(tmp_path):
    printed = run("story_writer.py", "--frames", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert printed.count("[picture ") == 2, printed
    assert (tmp_path / "story.html").read_text().count("<img") == 2


def test_the_editing_agent_applies_each_instruction_to_the_last_picture(tmp_path):
    printed = run("editing_agent.py", "--out", str(tmp_path), cwd=tmp_path)
    pictures = [read_scene(Image.open(tmp_path / f"edit-{step}.png")) for step in range(3)]
    assert pictures == [Scene.of(Shape("circle", "red", "top-left"), Shape("square", "blue", "center")),
                        Scene.of(Shape("circle", "green", "top-left"), Shape("square", "blue", "center")),
                        Scene.of(Shape("circle", "green", "top-left"), Shape("square", "blue", "bottom-right"))]
    assert printed.count(" -> ") == 2, printed
