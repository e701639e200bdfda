"""An editing agent: a picture and a list of instructions, applied one after another in one session.

Each edit takes the session's last picture as its source (three-branch guidance: full, no-text, no-image),
so the history holds every version; every step is saved as a PNG.

    python examples/editing_agent.py                                   # tiny model, a shapes scene
    python examples/editing_agent.py photo.jpg "make the sky purple" "add a moon" \
        --model /path/to/LLaDA2.0-Uni --device cuda
"""

import argparse
import asyncio
from pathlib import Path

import llada_agent
from llada_agent import EditOptions, ImagePart


def starting_picture(path: str | None) -> ImagePart:
    if path:
        return ImagePart.open(path)
    from runtime.tiny.world import Scene, Shape, render

    return ImagePart.from_pil(render(Scene.of(Shape("circle", "red", "top-left"),
                                              Shape("square", "blue", "center")), 96))


async def main(args: argparse.Namespace) -> None:
    instructions = args.instructions or ["make the red circle green.", "move the blue square to the bottom-right."]
    out = Path(args.out)
    async with llada_agent.load(args.model, device=args.device) as model:
        session = model.session(mode="edit")
        picture = starting_picture(args.image)
        picture.save(out / "edit-0.png")
        for step, instruction in enumerate(instructions, start=1):
            source = picture if step == 1 else None  # later steps edit the session's last picture
            reply = await session.edit(instruction, image=source, options=EditOptions(decoder_mode="turbo"))
            path = reply.image.save(out / f"edit-{step}.png")
            print(f"{step}. {instruction} -> {path}")
            if args.model == "tiny":
                from runtime.tiny.world import SceneReadError, describe, read_scene

                try:
                    print(f"   the picture now shows {describe(read_scene(reply.image.pil()))}")
                except SceneReadError as error:
                    print(f"   (the checker cannot read it: {error})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", default=None)
    parser.add_argument("instructions", nargs="*")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out")
    asyncio.run(main(parser.parse_args()))
