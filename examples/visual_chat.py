"""A visual chat in the terminal: attach pictures, ask about them, keep the conversation going.

The session's history (text and pictures, as exact token ids) stays cached across turns, so each answer
only computes its own new blocks — watch the "cached" count grow.

    python examples/visual_chat.py                         # the bundled tiny model (shapes world)
    python examples/visual_chat.py --model /path/to/LLaDA2.0-Uni --device cuda

Type a question; `/image PATH` attaches a picture to the next question (on the tiny model, `/scene` draws
a random shapes scene to talk about); `/quit` leaves.
"""

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

import llada_agent
from llada_agent import ImagePart


async def main(args: argparse.Namespace) -> None:
    async with llada_agent.load(args.model, device=args.device) as model:
        chat = model.session(mode="chat")
        attached: list[ImagePart] = []
        rng = random.Random(0)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if line in ("/quit", "/exit"):
                break
            if line == "/scene":
                from runtime.tiny.world import describe, render, sample_scene

                scene = sample_scene(rng)
                path = Path(tempfile.gettempdir()) / "scene.png"
                render(scene, 96).save(path)
                attached.append(ImagePart.open(path))
                print(f"   attached {path} (it shows {describe(scene)})")
                continue
            if line.startswith("/image "):
                attached.append(ImagePart.open(line.removeprefix("/image ").strip()))
                print("   attached")
                continue
            if not line:
                continue
            reply = await chat.ask(line, image=attached or None)
            attached = []
            print(f"model> {reply.text.strip()}")
            print(f"   ({reply.usage.prompt_tokens} prompt tokens, {reply.usage.cached_tokens} from cache)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    asyncio.run(main(parser.parse_args()))
