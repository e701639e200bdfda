"""The command line, end to end on a tiny random checkpoint in the official layout."""

import pytest

from llada_agent.cli import main
from runtime.testing.checkpoint import write_tiny_checkpoint
from runtime.testing.vision import write_tiny_vision_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_checkpoint(root)
    write_tiny_vision_checkpoint(root)
    return root


def common(checkpoint, out):
    return ["--model", str(checkpoint), "--out", str(out), "--steps", "2", "--decoder", "turbo",
            "--max-tokens", "32", "--seed", "0"]


def test_draw_writes_a_picture(checkpoint, tmp_path, capsys):
    from PIL import Image

    assert main(["draw", "a red circle", "--size", "128", *common(checkpoint, tmp_path)]) == 0
    assert Image.open(tmp_path / "draw.png").size == (128, 128)
    assert "picture ->" in capsys.readouterr().out


def test_ask_answers_about_a_picture(checkpoint, tmp_path, capsys):
    assert main(["draw", "a red circle", "--size", "128", *common(checkpoint, tmp_path)]) == 0
    assert main(["ask", "what is it?", str(tmp_path / "draw.png"), *common(checkpoint, tmp_path)]) == 0


def test_story_writes_a_page(checkpoint, tmp_path):
    assert main(["story", "a short tale", "--frames", "1", *common(checkpoint, tmp_path)]) == 0
    page = (tmp_path / "story.html").read_text()
    assert page.startswith("<!doctype html>") and "a short tale" in page


def test_a_missing_picture_is_a_clear_error(checkpoint, tmp_path, capsys):
    assert main(["ask", "what is it?", str(tmp_path / "nope.png"), *common(checkpoint, tmp_path)]) == 1
    assert "llada-agent:" in capsys.readouterr().err


def test_unknown_commands_are_refused():
    with pytest.raises(SystemExit):
        main(["paint"])
