"""The HTTP server over real HTTP on loopback: OpenAI-compatible chat and image endpoints, sessions whose
history stays cached, streaming, and OpenAI-shaped errors. A random tiny checkpoint answers; scripted
text makes outputs exact where a test needs them."""

import asyncio
import base64
import io
import json
import socket
import threading

import httpx
import pytest
import uvicorn
from PIL import Image

import llada_agent
from llada_agent.cli import COMMANDS, build_parser, cmd_serve
from llada_agent.errors import Busy, ImageError
from llada_agent.server import PayloadTooLarge, ServerBusy, ServerLimits, SessionNotFound, _status, create_app
from llada_agent.testing import scripted_text, write_tiny_model
from runtime.errors import EngineBusyError

FAST = {"dllm_steps": 2, "decode_mode": "decoder-turbo", "decoder_steps": 2, "seed": 0}
LIMITS = ServerLimits(max_body_bytes=1 << 20, max_image_bytes=64 << 10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = write_tiny_model(tmp_path_factory.mktemp("server") / "tiny")
    # Pictures read as a 2x2 grid: edits and understanding stay within the tiny context.
    config = root / "image_tokenizer" / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "size": {"height": 32, "width": 32}}))
    return llada_agent.load(root)


@pytest.fixture(scope="module")
def client(model):
    """A client of the server, running in a thread on a free loopback port (bound before it starts, so
    requests simply wait in the backlog until the server accepts). The model is started here, so tests
    can script it from the start; the server closes it when it stops."""
    asyncio.run(model.start())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(model, name="tiny-test", limits=LIMITS), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=120) as http:
        yield http
    server.should_exit = True
    thread.join(timeout=60)
    sock.close()


def said(model, text, stop=None):
    """What a scripted model writes: `text`, then end-of-text (or `stop`)."""
    return model.codec.encode_text(text) + (stop if stop is not None else [model.codec.special.eos])


def png(size=(48, 40), color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data):
    return "data:image/png;base64," + base64.b64encode(data).decode()


def picture(image):
    """The PIL picture of an image object `{data, width, height, ...}`, checked against its size."""
    pil = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert pil.format == "PNG" and pil.size == (image["width"], image["height"])
    return pil


def user(content):
    return [{"role": "user", "content": content}]


def error_of(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def sse_events(response):
    """The JSON payloads of an SSE response (comments skipped), checking it ends with [DONE]."""
    lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# ---------------------------------------------------------------------------------------------------------
# Chat completions


def test_a_chat_completion_answers_in_openai_shape(client, model):
    with scripted_text(model, [said(model, "A red square.")]):
        response = client.post("/v1/chat/completions", json={
            "model": "tiny-test", "messages": [{"role": "system", "content": "Be brief."},
                                               *user("What is it?")], "max_tokens": 32})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-test"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "A red square."}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_a_question_about_an_inline_picture_is_answered(client, model):
    content = [{"type": "image_url", "image_url": {"url": data_uri(png())}}, {"type": "text", "text": "Color?"}]
    with scripted_text(model, [said(model, "Red.")]) as script:
        response = client.post("/v1/chat/completions", json={"messages": user(content), "max_tokens": 16})
    assert response.json()["choices"][0]["message"]["content"] == "Red."
    # The prompt holds the picture's span: 2x2 codes between the image markers.
    prompt = script.requests[0].prompt
    assert model.codec.special.image_start in prompt and model.codec.special.image_end in prompt


def test_text_to_image_returns_a_png_of_the_requested_size(client):
    response = client.post("/v1/chat/completions", json={
        "messages": user("a red circle"), "modalities": ["image"],
        "image_generation": {"mode": "normal", "image_h": 64, "image_w": 96, "cfg_scale": 2.0, **FAST}})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["content"] is None
    assert picture(message["image"]).size == (96, 64)


def test_a_picture_and_image_generation_make_an_edit_of_the_source_size(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(png())}}, {"type": "text", "text": "bluer"}]
    response = client.post("/v1/chat/completions", json={
        "messages": user(content), "modalities": ["image"],
        "image_generation": {"cfg_text_scale": 3.0, "cfg_image_scale": 1.5, **FAST}})
    assert response.status_code == 200, response.text
    assert picture(response.json()["choices"][0]["message"]["image"]).size == (64, 64)


def test_thinking_mode_returns_the_plan_as_text_and_the_picture(client, model):
    plan = said(model, "A small wide picture.", stop=model.codec.image_header(1, 2))
    with scripted_text(model, [plan]):
        response = client.post("/v1/chat/completions", json={
            "messages": user("draw something"), "modalities": ["text", "image"],
            "image_generation": {"mode": "thinking", **FAST}})
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "A small wide picture."
    assert picture(message["image"]).size == (64, 32)


def test_interleaved_mode_returns_ordered_text_and_image_refs(client, model):
    codec = model.codec
    script = [said(model, "Once", stop=codec.image_header(1, 1)), said(model, " the end.")]
    with scripted_text(model, script):
        response = client.post("/v1/chat/completions", json={
            "messages": user("a story"), "modalities": ["text", "image"],
            "image_generation": {"mode": "interleaved", "max_frames": 3, **FAST}})
    body = response.json()
    message = body["choices"][0]["message"]
    images = message["images"]
    assert [part["type"] for part in message["content"]] == ["text", "image_ref", "text"]
    assert [message["content"][0]["text"], message["content"][2]["text"]] == ["Once", " the end."]
    assert message["content"][1]["image_id"] == images[0]["id"] and len(images) == 1
    assert picture(images[0]).size == (32, 32) and images[0]["format"] == "png"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_a_previous_reply_with_a_picture_can_come_back_as_history(client, model):
    drawn = client.post("/v1/chat/completions", json={
        "messages": user("a circle"), "modalities": ["image"], "image_generation": FAST}).json()
    history = [*user("a circle"), drawn["choices"][0]["message"], *user("what did you draw?")]
    with scripted_text(model, [said(model, "A circle.")]):
        response = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 16})
    assert response.json()["choices"][0]["message"]["content"] == "A circle."


# ---------------------------------------------------------------------------------------------------------
# Streaming


def test_streamed_text_deltas_add_up_to_the_whole_answer(client):
    request = {"messages": user("tell me more"), "max_tokens": 70, "dllm_steps": 4}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(response)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([d for d in deltas if d]) >= 2
    assert "".join(deltas) == whole["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["finish_reason"]


def test_a_streamed_drawing_ends_with_the_picture_and_the_usage(client):
    request = {"messages": user("a square"), "modalities": ["image"], "image_generation": FAST, "stream": True,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = sse_events(response)
    *_, last, usage = chunks
    assert last["choices"][0]["finish_reason"] == "stop"
    assert picture(last["choices"][0]["delta"]["images"][0]).size == (64, 64)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0


def test_a_failing_stream_reports_the_error_as_an_event(client):
    request = {"messages": user("huge"), "modalities": ["image"], "stream": True,
               "image_generation": {"image_h": 1024, "image_w": 1024, **FAST}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = sse_events(response)
    assert chunks[-1]["error"]["code"] == "context_length_exceeded"


# ---------------------------------------------------------------------------------------------------------
# Images API


def test_images_generations_returns_base64_png_of_the_size(client):
    response = client.post("/v1/images/generations", json={
        "prompt": "a blue circle", "size": "64x32", "num_inference_steps": 2, "dllm_steps": 2,
        "decode_mode": "decoder-turbo", "seed": 1})
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 32)


def test_images_edits_takes_a_multipart_upload(client):
    response = client.post("/v1/images/edits", files={"image": ("source.png", png(), "image/png")},
                           data={"prompt": "make it green", "response_format": "url", "dllm_steps": "2",
                                 "num_inference_steps": "2", "decode_mode": "decoder-turbo",
                                 "cfg_text_scale": "2.5"})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (64, 64)


def test_images_edits_refuses_a_request_without_an_image(client):
    response = client.post("/v1/images/edits", data={"prompt": "make it green"})
    error_of(response, 400, "invalid_request")


# ---------------------------------------------------------------------------------------------------------
# Sessions


def test_a_session_keeps_its_history_cached_across_turns(client):
    created = client.post("/v1/sessions", json={"mode": "chat", "system": "You answer in a few words."})
    assert created.status_code == 201
    session_id = created.json()["id"]
    url = f"/v1/sessions/{session_id}/messages"
    request = {"max_tokens": 32, "dllm_steps": 4}
    first = client.post(url, json={"messages": user("What is in the picture?"), **request}).json()
    second = client.post(url, json={"messages": user("And its size?"), **request}).json()
    assert first["session_id"] == second["session_id"] == session_id
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The second turn reads the first turn's completed blocks from the cache instead of computing them.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
    history = client.get(f"/v1/sessions/{session_id}").json()
    assert [m["role"] for m in history["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert history["turns"] == 2 and history["tokens"] > first["usage"]["total_tokens"]
    assert history["messages"][2]["parts"] == [{"type": "text", "text": first["choices"][0]["message"]["content"]}]


def test_a_draw_session_draws_by_default_and_edits_its_last_picture(client):
    session_id = client.post("/v1/sessions", json={"mode": "draw"}).json()["id"]
    url = f"/v1/sessions/{session_id}/messages"
    drawn = client.post(url, json={"messages": user("a circle"), "image_generation": FAST}).json()
    assert picture(drawn["choices"][0]["message"]["image"]).size == (64, 64)
    edited = client.post(url, json={"messages": user("now green"), "task": "edit", "image_generation": FAST})
    assert edited.status_code == 200, edited.text
    assert picture(edited.json()["choices"][0]["message"]["image"]).size == (64, 64)


def test_a_deleted_session_is_gone(client):
    session_id = client.post("/v1/sessions", json={}).json()["id"]
    assert client.delete(f"/v1/sessions/{session_id}").json()["deleted"] is True
    error_of(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


def test_a_session_answers_one_request_at_a_time(client, model):
    session_id = client.post("/v1/sessions", json={}).json()["id"]
    url = f"/v1/sessions/{session_id}/messages"
    gate = Gate(model)
    with gate:
        first = {}
        worker = threading.Thread(target=lambda: first.update(response=httpx.post(
            f"{client.base_url}{url}", json={"messages": user("first"), "max_tokens": 8, "dllm_steps": 2},
            timeout=120)))
        worker.start()
        assert gate.entered.wait(timeout=60)
        error_of(client.post(url, json={"messages": user("second")}), 409, "session_busy")
        gate.open.set()
        worker.join(timeout=60)
    assert first["response"].status_code == 200


class Gate:
    """Holds the model's engine requests until `open` is set (`entered` says one is waiting)."""

    def __init__(self, model):
        self.model = model
        self.entered = threading.Event()
        self.open = threading.Event()

    def __enter__(self):
        self.engine = self.model._engine
        gate = self

        class Engine:
            def submit(self, request, *, timeout=None):
                return Handle(gate.engine.submit(request, timeout=timeout))

            def __getattr__(self, name):
                return getattr(gate.engine, name)

        class Handle:
            def __init__(self, handle):
                self.handle = handle

            def cancel(self):
                self.handle.cancel()

            async def _events(self):
                gate.entered.set()
                await asyncio.to_thread(gate.open.wait)
                async for event in self.handle:
                    yield event

            def __aiter__(self):
                return self._events()

            async def result(self):
                return await self.handle.result()

        self.model._engine = Engine()
        return self

    def __exit__(self, *exc_info):
        self.open.set()
        self.model._engine = self.engine


# ---------------------------------------------------------------------------------------------------------
# Errors and small endpoints


def test_bad_json_is_a_400(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in error_of(response, 400, "invalid_request")["message"]


def test_unknown_fields_and_bad_values_are_refused(client):
    error_of(client.post("/v1/chat/completions", json={"messages": user("hi"), "frequency_penaltyy": 1}),
             400, "invalid_request")
    error_of(client.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": "10"}),
             400, "invalid_request")
    error_of(client.post("/v1/chat/completions", json={"messages": user("hi"), "modalities": ["image"],
                                                       "image_generation": {"image_h": 50, "image_w": 64}}),
             400, "invalid_request")


def test_an_unknown_session_is_a_404(client):
    error_of(client.post("/v1/sessions/sess-nope/messages", json={"messages": user("hi")}), 404, "session_not_found")


def test_corrupt_base64_is_an_invalid_image(client):
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]
    error_of(client.post("/v1/chat/completions", json={"messages": user(content)}), 400, "invalid_image")


def test_bytes_that_are_no_picture_are_an_invalid_image(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(b"\x89PNG but not really")}}]
    error_of(client.post("/v1/chat/completions", json={"messages": user(content)}), 400, "invalid_image")


def test_remote_image_urls_are_not_fetched(client):
    content = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]
    assert "inline" in error_of(client.post("/v1/chat/completions", json={"messages": user(content)}),
                                400, "invalid_image")["message"]


def test_an_oversized_image_is_a_413(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(bytes(LIMITS.max_image_bytes + 1))}}]
    error_of(client.post("/v1/chat/completions", json={"messages": user(content)}), 413, "payload_too_large")


def test_an_oversized_body_is_a_413(client):
    big = "x" * LIMITS.max_body_bytes
    error_of(client.post("/v1/chat/completions", json={"messages": user(big)}), 413, "payload_too_large")


def test_unknown_routes_are_openai_shaped_404s(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_models_and_health(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-test"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["cache"]["enabled"] is True


def test_sdk_errors_map_to_their_statuses():
    engine_busy = Busy("queue full")
    engine_busy.__cause__ = EngineBusyError("full")
    assert _status(Busy("session busy"))[0] == 409
    assert _status(engine_busy)[0] == _status(ServerBusy("full"))[0] == 429
    assert _status(SessionNotFound("x"))[0] == 404
    assert _status(PayloadTooLarge("x"))[0] == 413
    assert _status(ImageError("x"))[:1] == (400,)
    assert _status(RuntimeError("bug"))[0] == 500


def test_the_cli_has_a_serve_command():
    args = build_parser().parse_args(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port) == ("0.0.0.0", 9000) and COMMANDS[args.command] is cmd_serve
