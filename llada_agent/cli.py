"""`llada-agent`: the command line — demo, chat, ask, draw, edit, story, serve.

Every command takes `--model` (default "tiny": the bundled model, runs on any CPU; or a checkpoint folder in
the official layout, a Hub id, or the URL of a `llada-agent serve` server) and `--device` / `--dtype`. Long
work shows progress on stderr; answers go to stdout; pictures and pages are written where `--out` says.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import load
from .errors import LLaDAError
from .html import write_page
from .remote import RemoteModel
from .schemas import (
    EditOptions,
    ErrorEvent,
    ImageDecodeProgress,
    ImageOptions,
    ImagePart,
    ImageProgress,
    ImageStarted,
    Reply,
    StoryOptions,
    TextBlock,
    TextOptions,
    ThinkingBlock,
    ThinkOptions,
    TurnDone,
)
from .session import Session


class Progress:
    """A one-line progress bar on stderr, redrawn in place (silent when stderr is not a terminal: a log
    would collect every redraw)."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.active = False

    def show(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 28
        filled = width * done // max(total, 1)
        self.stream.write(f"\r  {label:<16} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        self.stream.flush()
        self.active = True

    def end(self) -> None:
        if self.active:
            self.stream.write("\n")
            self.stream.flush()
            self.active = False


async def run_turn(session: Session, content: Any, *, task: str, options: Any = None, echo: bool = True,
                   indent: str = "") -> Reply:
    """Run one turn, streaming text to stdout (a picture shows as "[picture N]" where it stands; text after
    it starts a line with `indent`) and image progress to stderr; returns the reply. The turn's output ends
    with a line break."""
    progress = Progress()
    reply = None
    line_open = False  # stdout holds text not yet ended by a line break
    after_picture = False
    async with session.stream(content, task=task, options=options) as events:
        async for event in events:
            if isinstance(event, (ThinkingBlock, TextBlock)) and echo:
                progress.end()
                text = _dim(event.text) if isinstance(event, ThinkingBlock) else event.text
                print(f"{indent if after_picture and not line_open else ''}{text}", end="", flush=True)
                line_open = True
            elif isinstance(event, ImageStarted):
                progress.end()
                if echo:
                    print(f"{' ' if line_open else '   '}[picture {event.index + 1}]", flush=True)
                    line_open, after_picture = False, True
                progress.show("drawing", 0, event.grid[0] * event.grid[1])
            elif isinstance(event, ImageProgress):
                progress.show("drawing", event.committed, event.total)
            elif isinstance(event, ImageDecodeProgress):
                progress.show("decoding", event.step, event.total)
            elif isinstance(event, ErrorEvent):
                progress.end()
            elif isinstance(event, TurnDone):
                reply = event.reply
    progress.end()
    if line_open:
        print()
    assert reply is not None
    return reply


def _dim(text: str) -> str:
    """Thinking text, dimmed on a terminal."""
    return f"\033[2m{text}\033[0m" if sys.stdout.isatty() else text


def save_images(reply: Reply, out: Path, stem: str) -> list[Path]:
    paths = []
    for i, image in enumerate(reply.images):
        if image.png is not None:
            suffix = f"-{i + 1}" if len(reply.images) > 1 else ""
            paths.append(image.save(out / f"{stem}{suffix}.png"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Commands


async def cmd_demo(args: argparse.Namespace) -> None:
    from runtime.tiny.world import Scene, Shape, render

    out = Path(args.out)
    started = time.perf_counter()
    entries: list[tuple[str, list[ImagePart], Reply]] = []
    async with _load(args) as model:
        print(f"model: {_where(model)}")
        scene = Scene.of(Shape("circle", "red", "top-left"), Shape("square", "blue", "center"))
        picture = ImagePart.from_pil(render(scene, 128))

        print("\n1. visual chat — the user shows a picture and asks about it")
        chat = model.session(mode="chat")
        # Phrased as the tiny world's questions are ("the one at ..."); it was taught no other wording.
        for question in ("describe the image.", "what shape is the one at the center?"):
            print(f"   user: {question}\n   model: ", end="")
            reply = await run_turn(chat, [picture, question], task="chat", options=_text_options(args))
            entries.append((question, [picture], reply))
        print(f"   (second question reused {reply.usage.cached_tokens} cached prompt tokens)")

        print("\n2. thinking-mode drawing — a riddle needs a plan before the picture")
        riddle = "draw a shape that is round in the color of the sky at the center."
        print(f"   user: {riddle}\n   model thinks: ", end="")
        think = model.session(mode="think")
        reply = await run_turn(think, riddle, task="think", options=ThinkOptions(image=_image_options(args)))
        entries.append((riddle, [], reply))
        _report_images(reply, out, "riddle")

        print("\n3. editing — change the picture from step 1")
        instruction = "make the red circle green."
        print(f"   user: {instruction}")
        edit = model.session(mode="edit")
        reply = await run_turn(edit, [picture, instruction], task="edit", options=_edit_options(args))
        entries.append((instruction, [picture], reply))
        _report_images(reply, out, "edit")

        print("\n4. an interleaved story")
        prompt = "tell a story in 3 frames about a red circle."
        print(f"   user: {prompt}\n   model: ", end="")
        story = model.session(mode="story")
        reply = await run_turn(story, prompt, task="story", options=_story_options(args, 3), indent=" " * 10)
        entries.append((prompt, [], reply))
        _report_images(reply, out, "story")

    page = write_page(out / "demo.html", "llada-agent demo", entries)
    print(f"\nwrote {page} with every picture ({time.perf_counter() - started:.0f} s in all)")


async def cmd_ask(args: argparse.Namespace) -> None:
    async with _load(args) as model:
        session = model.session(mode="chat")
        images = [ImagePart.open(path) for path in args.image]
        await run_turn(session, [*images, args.question], task="chat", options=_text_options(args))


async def cmd_draw(args: argparse.Namespace) -> None:
    async with _load(args) as model:
        if args.thinking:
            session = model.session(mode="think")
            reply = await run_turn(session, args.prompt, task="think",
                                   options=ThinkOptions(image=_image_options(args)))
        else:
            session = model.session(mode="draw")
            reply = await run_turn(session, args.prompt, task="draw", options=_image_options(args))
        _report_images(reply, Path(args.out), "draw")


async def cmd_edit(args: argparse.Namespace) -> None:
    async with _load(args) as model:
        session = model.session(mode="edit")
        images = [ImagePart.open(path) for path in args.image]
        reply = await run_turn(session, [*images, args.instruction], task="edit", options=_edit_options(args))
        _report_images(reply, Path(args.out), "edit")


async def cmd_story(args: argparse.Namespace) -> None:
    async with _load(args) as model:
        session = model.session(mode="story")
        reply = await run_turn(session, args.prompt, task="story", options=_story_options(args, args.frames))
        page = write_page(Path(args.out) / "story.html", args.prompt, [(args.prompt, [], reply)])
        print(f"wrote {page}")


async def cmd_chat(args: argparse.Namespace) -> None:
    print("Chat with the model. Type a message; '/image PATH' attaches a picture to the next message, "
          "'/draw PROMPT' draws, '/edit INSTRUCTION' edits the last picture, '/quit' leaves.")
    out = Path(args.out)
    async with _load(args) as model:
        session = model.session(mode="chat")
        pending: list[ImagePart] = []
        drawn = 0
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, _read_line, "you> ")).strip()
            if line in ("", "/quit", "/exit"):
                if line:
                    break
                continue
            try:
                if line.startswith("/image "):
                    pending.append(ImagePart.open(line.removeprefix("/image ").strip()))
                    print(f"   attached ({len(pending)} picture(s) for the next message)")
                    continue
                if line.startswith(("/draw ", "/edit ")):
                    task = "draw" if line.startswith("/draw ") else "edit"
                    reply = await run_turn(session, [*pending, line[6:]], task=task)
                    drawn += 1
                    _report_images(reply, out, f"chat-{drawn}")
                else:
                    print("model> ", end="")
                    await run_turn(session, [*pending, line], task="chat", options=_text_options(args))
                pending = []
            except LLaDAError as error:
                print(f"   error: {error}")


async def cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    await serve(_load(args), host=args.host, port=args.port, log_level=args.log_level)


def _read_line(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return "/quit"


# ---------------------------------------------------------------------------------------------------------
# Plumbing


def _where(model: Any) -> str:
    if isinstance(model, RemoteModel):
        return f"{model.name} at {model.url}"
    return f"{model.source} on {model.device} ({str(model.dtype).removeprefix('torch.')})"


def _load(args: argparse.Namespace):
    return load(args.model, device=args.device, dtype=args.dtype, decoder_mode=args.decoder)


def _text_options(args: argparse.Namespace) -> TextOptions | None:
    return TextOptions(max_tokens=args.max_tokens) if args.max_tokens else None


def _image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(**({"steps": args.steps} if args.steps else {}), seed=args.seed,
                        **({"size": (args.size, args.size)} if getattr(args, "size", None) else {}))


def _story_options(args: argparse.Namespace, frames: int) -> StoryOptions:
    text = {"text": TextOptions(max_tokens=args.max_tokens)} if args.max_tokens else {}
    return StoryOptions(max_frames=frames, **text)


def _edit_options(args: argparse.Namespace) -> EditOptions:
    return EditOptions(**({"steps": args.steps} if args.steps else {}), seed=args.seed)


def _report_images(reply: Reply, out: Path, stem: str) -> None:
    paths = save_images(reply, out, stem)
    for path in paths:
        print(f"   picture -> {path}")
    if not paths:
        print(f"   ({len(reply.images)} picture(s), not decoded; finish: {reply.finish_reason})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="tiny", help='"tiny", a checkpoint folder, a Hub id, or a server URL')
    common.add_argument("--device", default="cpu")
    common.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    common.add_argument("--decoder", default=None, choices=["normal", "turbo"],
                        help="image decoder (default: the checkpoint's recommendation, else normal)")
    common.add_argument("--steps", type=int, default=None, help="denoising steps per block for pictures")
    common.add_argument("--max-tokens", type=int, default=None, help="most tokens of text per answer")
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--out", default="out", help="folder for pictures and pages")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", parents=[common], help="a minute-long tour: chat, thinking draw, edit, story")
    commands.add_parser("chat", parents=[common], help="an interactive chat with pictures")
    ask = commands.add_parser("ask", parents=[common], help="ask a question about one or more pictures")
    ask.add_argument("question")
    ask.add_argument("image", nargs="*")
    draw = commands.add_parser("draw", parents=[common], help="draw a picture")
    draw.add_argument("prompt")
    draw.add_argument("--thinking", action="store_true", help="plan in words first, then draw")
    draw.add_argument("--size", type=int, default=None, help="square size in pixels (multiple of 32)")
    edit = commands.add_parser("edit", parents=[common], help="edit a picture")
    edit.add_argument("instruction")
    edit.add_argument("image", nargs="+")
    story = commands.add_parser("story", parents=[common], help="write an illustrated story (HTML page)")
    story.add_argument("prompt")
    story.add_argument("--frames", type=int, default=4)
    serve = commands.add_parser("serve", parents=[common],
                                help="serve the model over HTTP: OpenAI-compatible API plus sessions")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


COMMANDS = {"demo": cmd_demo, "chat": cmd_chat, "ask": cmd_ask, "draw": cmd_draw, "edit": cmd_edit,
            "story": cmd_story, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(COMMANDS[args.command](args))
    except LLaDAError as error:
        print(f"llada-agent: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
