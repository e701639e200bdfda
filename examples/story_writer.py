"""An illustrated story: the model writes and draws in turn; the result is one HTML page.

From the second picture on, drawing is guided editing-style against the story so far, so frames stay
consistent.

    python examples/story_writer.py "tell a story in 3 frames about a red circle."
    python examples/story_writer.py "a fox's day in the forest" --frames 4 --model /path/to/LLaDA2.0-Uni --device cuda
"""

import argparse
import asyncio
from pathlib import Path

import llada_agent
from llada_agent.html import write_page


async def main(args: argparse.Namespace) -> None:
    async with llada_agent.load(args.model, device=args.device) as model:
        session = model.session(mode="story")
        async with session.stream(args.prompt, task="story",
                                  options=llada_agent.StoryOptions(max_frames=args.frames)) as events:
            async for event in events:
                if event.type == "text_block":
                    print(event.text, end="", flush=True)
                elif event.type == "image_started":  # where the picture stands (it decodes in the background)
                    print(f" [picture {event.index + 1}]", flush=True)
                elif event.type == "turn_done":
                    reply = event.reply
        page = write_page(Path(args.out) / "story.html", args.prompt, [(args.prompt, [], reply)])
        print(f"\nwrote {page}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="tell a story in 3 frames about a red circle.")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out")
    asyncio.run(main(parser.parse_args()))
