"""Saving and loading sessions: continuing a loaded session is exact; a tampered file is refused, typed."""

import asyncio
import json

import pytest

import llada_agent
from llada_agent import ImageOptions, Session, SessionFileError, TextOptions
from llada_agent.testing import write_tiny_model

TEXT = TextOptions(max_tokens=40, steps=4)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = llada_agent.load(write_tiny_model(tmp_path_factory.mktemp("files") / "tiny"))
    run(model.start())
    yield model
    run(model.close())


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A saved two-turn session (text, then a picture) and the session itself."""
    session = model.session(system="saved")
    run(session.ask("hello", options=TEXT))
    run(session.draw("a circle", options=ImageOptions(grid=(2, 2), steps=2, decode=False)))
    path = session.save(tmp_path_factory.mktemp("saved") / "session.json")
    return path, session


def tampered(saved, tmp_path, change):
    path, _ = saved
    data = json.loads(path.read_text())
    change(data)
    out = tmp_path / "tampered.json"
    out.write_text(json.dumps(data))
    return out


def test_save_load_continue_gives_the_ids_of_never_saving(model, saved):
    path, session = saved
    loaded = Session.load(model, path)
    assert loaded.ids == session.ids and loaded.messages == session.messages
    continued = run(loaded.ask("and then?", options=TEXT))
    never_saved = run(session.fork().ask("and then?", options=TEXT))
    assert continued.ids == never_saved.ids


def assistant_turn(data, kind):
    return next(t for t in data["turns"] if t["message"]["role"] == "assistant"
                and t["message"]["parts"][0]["type"] == kind)


def break_image_grammar(data):
    turn = assistant_turn(data, "image")
    del turn["ids"][8]  # a code less: the span's count no longer matches its header
    turn["message"]["parts"][0]["codes"].pop()
    turn["message"]["parts"][0]["grid"] = [1, 3]


@pytest.mark.parametrize("change, reason", [
    (lambda d: assistant_turn(d, "text")["ids"].__setitem__(-2, 10**7), "outside the vocabulary"),
    (lambda d: assistant_turn(d, "text")["message"]["parts"][0].__setitem__("text", "forged"), "text differs"),
    (lambda d: d["turns"][1]["message"]["parts"][0].__setitem__("text", "forged"), "do not match"),
    (lambda d: assistant_turn(d, "image")["message"]["parts"][0]["codes"].__setitem__(0, 7), "codes differ"),
    (break_image_grammar, "grammar"),
    (lambda d: d.__setitem__("checkpoint", "0" * 16), "another checkpoint"),
    (lambda d: d["turns"].pop(), "roles"),
    (lambda d: d.__setitem__("version", 2), "not a valid session file"),
])
def test_a_tampered_file_raises_a_typed_error_and_changes_nothing(model, saved, tmp_path, change, reason):
    path = tampered(saved, tmp_path, change)
    before = path.read_bytes()
    with pytest.raises(SessionFileError, match=reason):
        Session.load(model, path)
    assert path.read_bytes() == before


def test_a_file_that_is_not_json_raises_a_typed_error(model, tmp_path):
    path = tmp_path / "junk.json"
    path.write_text("{not json")
    with pytest.raises(SessionFileError):
        Session.load(model, path)
    with pytest.raises(SessionFileError):
        Session.load(model, tmp_path / "missing.json")
