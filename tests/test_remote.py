"""`load("http://...")`: sessions on a llada-agent server, over real HTTP on loopback, against the same
sessions run in this process. The bundled tiny model answers, so what comes back can be checked for
meaning (the picture read back by the world's checker) as well as for exactness (the same ids)."""

import asyncio
import socket

import httpx
import pytest

import llada_agent
from llada_agent import (
    Busy,
    ContextLengthError,
    ImageError,
    ImageOptions,
    ImagePart,
    InvalidInputError,
    ModelClosed,
    ModelLoadError,
    RemoteModel,
    SessionNotFound,
    TextOptions,
)
from llada_agent.hooks import Hooks
from llada_agent.server import ServerLimits, create_app
from llada_agent.testing import serving
from runtime.tiny.world import Scene, Shape, describe, read_scene, render

PICTURE = Scene.of(Shape("circle", "red", "top-left"), Shape("square", "blue", "center"))
SEEDED = ImageOptions(seed=3)


@pytest.fixture(scope="module")
def url():
    """A server of the bundled tiny model."""
    app = create_app(llada_agent.load("tiny"), name="tiny", limits=ServerLimits(max_image_bytes=256 << 10))
    with serving(app) as address:
        yield address


def run(scenario):
    return asyncio.run(scenario())


def picture(scene=PICTURE):
    return ImagePart.from_pil(render(scene, 96))


def test_a_remote_session_answers_as_a_local_one_and_reuses_its_history(url):
    async def turns(session):
        first = await session.ask("describe the image.", image=picture())
        second = await session.ask("what shape is the one at the center?")
        return first, second

    async def scenario():
        async with llada_agent.load(url) as remote, llada_agent.load("tiny") as local:
            assert isinstance(remote, RemoteModel) and remote.name == "tiny"
            session = remote.session(mode="chat")
            replies = await turns(session)
            expected = await turns(local.session(mode="chat"))
            return session, replies, expected

    session, (first, second), (local_first, local_second) = run(scenario)
    assert first.text == describe(PICTURE) and second.text == "square"
    # The same ids as the same turns in this process: nothing is lost or re-tokenised on the way.
    assert (first.ids, second.ids) == (local_first.ids, local_second.ids)
    # The second turn read the first turn's blocks from the server's cache.
    assert second.usage.cached_tokens >= 32
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2].text == first.text


def test_streamed_events_are_typed_and_end_with_the_reply_a_send_would_give(url):
    async def scenario():
        async with llada_agent.load(url) as remote:
            session = remote.session(mode="draw")
            async with session.stream("draw a green triangle at the bottom.", options=SEEDED) as stream:
                events = [event async for event in stream]
            sent = await remote.session(mode="draw").draw("draw a green triangle at the bottom.", options=SEEDED)
            return events, stream.reply, sent

    events, reply, sent = run(scenario)
    kinds = [event.type for event in events]
    assert kinds[0] == "image_started" and "image_progress" in kinds
    assert kinds.index("image_tokens_done") < kinds.index("image_decoded") < kinds.index("turn_done") == len(kinds) - 1
    assert events[-1].reply == reply and reply.image.codes == sent.image.codes
    assert read_scene(reply.image.pil()) == Scene.of(Shape("triangle", "green", "bottom"))


def test_a_remote_drawing_is_edited_on_the_server_and_a_fork_continues_from_it(url):
    async def scenario():
        async with llada_agent.load(url) as remote, llada_agent.load("tiny") as local:
            results = []
            for model in (remote, local):
                session = model.session(mode="draw")
                await session.draw("draw a red circle at the top-left.", options=SEEDED)
                edited = await session.edit("make the red circle blue.")  # the session's last picture
                fork = session.fork()
                await session.edit("remove the blue circle.")
                moved = await fork.edit("move the blue circle to the right.")
                results.append((edited, moved, fork.messages))
            return results

    (edited, moved, fork_messages), (local_edited, local_moved, _) = run(scenario)
    assert read_scene(edited.image.pil()) == Scene.of(Shape("circle", "blue", "top-left"))
    assert (edited.image.codes, moved.image.codes) == (local_edited.image.codes, local_moved.image.codes)
    # The fork kept the drawing and the first edit, not the edit its origin made after the fork.
    assert len(fork_messages) == 7 and fork_messages[-1].images[0].codes == moved.image.codes


def test_server_errors_come_back_as_the_sdks_typed_errors(url):
    async def scenario():
        async with llada_agent.load(url) as remote:
            session = remote.session()
            await session.ask("what is in the picture?", image=picture(), options=TextOptions(max_tokens=8))
            before = session.messages
            with pytest.raises(ContextLengthError):
                await session.ask("and now? " * 600)  # past the tiny model's context of 1024
            tampered = ImagePart(grid=(1, 1), codes=[10**6])
            with pytest.raises(ImageError, match="codes"):
                await session.ask("what is this?", image=tampered)
            with pytest.raises(ImageError):
                await remote.session(mode="edit").edit("make it green.")  # nothing to edit yet
            assert session.messages == before  # failed turns leave the history as it was, here and there
            assert (await remote._call("GET", f"/v1/sessions/{session.id}"))["turns"] == 1
            with pytest.raises(InvalidInputError, match="hooks"):
                await session.send("draw it", task="think", hooks=Hooks())
            await session.delete()
            await session.ask("and now?", options=TextOptions(max_tokens=8))  # a new session on the server
            assert len(session.messages) == 3
            gone = remote.session()
            await gone.ask("hello", options=TextOptions(max_tokens=4))
            await remote._call("DELETE", f"/v1/sessions/{gone.id}")
            with pytest.raises(SessionNotFound):
                await gone.ask("still there?")
        with pytest.raises(ModelClosed):
            remote.session()

    run(scenario)


def test_a_cancelled_remote_turn_leaves_the_session_as_it_was(url):
    async def scenario():
        async with llada_agent.load(url) as remote:
            session = remote.session(mode="draw")
            async with session.stream("draw a blue square at the center.", options=SEEDED) as stream:
                async for event in stream:
                    if event.type == "image_progress":
                        break  # leaving the block closes the connection: the server stops the turn
            assert not session.busy and len(session.messages) == 1
            running = asyncio.ensure_future(session.draw("draw a red circle at the left.", options=SEEDED))
            await asyncio.sleep(0.05)
            with pytest.raises(Busy):
                await session.draw("a second turn at once")
            session.cancel()
            with pytest.raises(llada_agent.Cancelled):
                await running
            reply = None
            for _ in range(100):  # the server may take a moment to notice the closed connection
                try:
                    reply = await session.draw("draw a yellow circle at the right.", options=SEEDED)
                    break
                except Busy:
                    await asyncio.sleep(0.1)
            on_server = await remote._call("GET", f"/v1/sessions/{session.id}")
            return session, reply, on_server

    session, reply, on_server = run(scenario)
    assert len(session.messages) == 3 and on_server["turns"] == 1
    assert read_scene(reply.image.pil()) == Scene.of(Shape("circle", "yellow", "right"))


def test_a_client_refuses_what_only_a_local_model_decides(url):
    with pytest.raises(InvalidInputError, match="device"):
        llada_agent.load(url, device="cuda")

    async def unreachable():
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        with pytest.raises(ModelLoadError, match="no llada-agent server"):
            await llada_agent.load(f"http://127.0.0.1:{port}").start()

    run(unreachable)


def test_the_turns_endpoint_answers_plain_http_clients_with_the_reply(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        session_id = http.post("/v1/sessions", json={"mode": "chat"}).json()["id"]
        body = {"content": [picture().model_dump(mode="json"), {"type": "text", "text": "describe the image."}]}
        response = http.post(f"/v1/sessions/{session_id}/turns", json=body)
        assert response.status_code == 200, response.text
        reply = llada_agent.Reply.model_validate(response.json()["reply"])
        assert reply.text == describe(PICTURE)
        bad = http.post(f"/v1/sessions/{session_id}/turns",
                        json={"content": [{"type": "text", "text": "hi"}], "options": {"max_tokens": 0}})
        assert bad.status_code == 400 and "TextOptions" in bad.json()["error"]["message"]
        fork = http.post(f"/v1/sessions/{session_id}/fork", json={"turns": 2})
        assert fork.status_code == 400 and "turns must be" in fork.json()["error"]["message"]
        assert http.post(f"/v1/sessions/{session_id}/fork", json={"turns": 0}).json()["turns"] == 0


def test_the_http_bench_runs_both_clients_through_the_same_conversation():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "remote.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--answer", "8"], capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["session_s"]) == len(report["stateless_s"]) == 8
    # Turns after the first find the history in the server's cache; the stateless client re-sent all of it
    # (its answers re-tokenised from text, so the count differs a little).
    assert report["cache_hit_ratio"] > 0.5
    assert report["stateless_turn8_prompt_tokens"] > 0.8 * report["turn8_prompt_tokens"]


# ---------------------------------------------------------------------------------------------------------
# A server without llada-agent sessions: the OpenAI-compatible API, the history re-sent each turn


def test_a_stateless_session_keeps_the_history_here_and_resends_it(url):
    async def scenario():
        async with RemoteModel(url, protocol="openai") as remote:
            session = remote.session(mode="chat")
            assert isinstance(session, llada_agent.StatelessSession)
            first = await session.ask("describe the image.", image=picture())
            second = await session.ask("what shape is the one at the center?")
            return session, first, second

    session, first, second = run(scenario)
    assert first.text == describe(PICTURE) and second.text == "square"
    # The second request carried the whole conversation: its prompt holds the picture and the first answer.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 9
    assert second.ids == [] and second.cache.enabled is False
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_a_stateless_session_draws_thinks_edits_and_tells_stories(url):
    async def scenario():
        async with RemoteModel(url, protocol="openai") as remote:
            draw = remote.session(mode="draw")
            drawn = await draw.draw("draw a red circle at the top-left.", options=SEEDED)
            edited = await draw.edit("make the red circle blue.")  # the last picture, sent back as PNG
            think = remote.session(mode="think")
            async with think.stream("draw a shape that is round in the color of the sky at the center.",
                                    options=llada_agent.ThinkOptions(image=SEEDED)) as stream:
                events = [event async for event in stream]
            story = await remote.session(mode="story").story("tell a story in 2 frames about a red circle.",
                                                              max_frames=2)
            return drawn, edited, events, story

    drawn, edited, events, story = run(scenario)
    assert read_scene(drawn.image.pil()) == Scene.of(Shape("circle", "red", "top-left"))
    assert read_scene(edited.image.pil()) == Scene.of(Shape("circle", "blue", "top-left"))
    kinds = [event.type for event in events]
    assert kinds[0] == "thinking_block" and kinds[-2:] == ["image_decoded", "turn_done"]
    thought = events[-1].reply
    assert thought.thinking.endswith("so a blue circle at the center.")
    assert read_scene(thought.image.pil()) == Scene.of(Shape("circle", "blue", "center"))
    assert [type(part).__name__ for part in story.parts][:2] == ["TextPart", "ImagePart"]
    assert 1 <= len(story.images) <= 2


def test_a_stateless_session_refuses_what_the_api_cannot_carry(url):
    async def scenario():
        async with RemoteModel(url, protocol="openai") as remote:
            session = remote.session()
            with pytest.raises(InvalidInputError, match="threshold"):
                await session.ask("hi", options=TextOptions(threshold=0.5))
            with pytest.raises(InvalidInputError, match="decode"):
                await session.draw("a circle", decode=False)
            with pytest.raises(InvalidInputError, match="codes"):
                await session.ask("what is this?", image=ImagePart(grid=(1, 1), codes=[3]))
            with pytest.raises(ContextLengthError):
                await session.ask("and now? " * 600)
            assert len(session.messages) == 1

    run(scenario)


def test_an_openai_only_server_gets_stateless_sessions_unless_sessions_are_required():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "LLaDA2.0-Uni", "object": "model"}]})

    app = Starlette(routes=[Route("/health", lambda request: PlainTextResponse("")),
                            Route("/v1/models", models)])

    async def scenario(address):
        async with llada_agent.load(address) as remote:
            assert remote.protocol == "openai" and remote.name == "LLaDA2.0-Uni"
            assert isinstance(remote.session(), llada_agent.StatelessSession)
        with pytest.raises(ModelLoadError, match="no llada-agent sessions"):
            await RemoteModel(address, protocol="sessions").start()

    with serving(app, ready="/v1/models") as address:
        asyncio.run(scenario(address))


def test_the_command_line_asks_and_draws_through_a_server(url, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    scene = tmp_path / "scene.png"
    render(PICTURE, 96).save(scene)

    def command(*args):
        result = subprocess.run([sys.executable, "-m", "llada_agent", *args, "--model", url], capture_output=True,
                                text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert describe(PICTURE) in command("ask", "describe the image.", str(scene))
    command("draw", "a green square at the bottom-right.", "--out", str(tmp_path), "--seed", "1")
    drawn = read_scene(Image.open(tmp_path / "draw.png").convert("RGB"))
    assert drawn == Scene.of(Shape("square", "green", "bottom-right"))


def test_the_turns_endpoint_refuses_bad_turns_with_400(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        session_id = http.post("/v1/sessions", json={"mode": "draw"}).json()["id"]
        turn = f"/v1/sessions/{session_id}/turns"

        def refused(body, words):
            response = http.post(turn, json=body)
            assert response.status_code == 400 and words in response.json()["error"]["message"], response.text

        refused({"content": [{"type": "thinking", "text": "a plan"}]}, "thinking")
        refused({"content": [{"type": "text", "text": "a circle"}], "options": {"cfg_text_scale": 2.0}},
                "ImageOptions")  # an edit's option on a drawing
        refused({"content": [{"type": "text", "text": "a circle"}], "task": "paint"}, "task")
        refused({"content": []}, "content")
        refused({"content": [{"type": "image", "grid": [40, 40], "codes": [0] * 1600}, {"type": "text", "text": "?"}],
                 "task": "chat"}, "grid")
        assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 0
