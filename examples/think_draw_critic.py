"""Think, draw, look, redraw: a think-then-draw agent that checks its own picture.

The model writes a plan, draws it, then is asked about its own drawing (in a forked session that shares
the cached conversation); when what it sees disagrees with the plan, it draws again.

On the bundled tiny model the check is a caption ("describe the image.") compared with the plan's
conclusion; on a real checkpoint the agent's built-in critic asks whether the picture matches.

    python examples/think_draw_critic.py "draw a shape that is round in the color of the sky at the center."
    python examples/think_draw_critic.py "a lighthouse on a cliff at dusk" --model /path/to/LLaDA2.0-Uni --device cuda
"""

import argparse
import asyncio
from pathlib import Path

import llada_agent
from llada_agent import Accept, ImageOptions, Redraw, TextOptions, ThinkOptions
from llada_agent.agents import ThinkDrawAgent


def caption_critic(model, image_options: ImageOptions):
    """Ask the model to caption its drawing; redraw (sampled) when the caption is not what it planned."""
    from runtime.tiny.world import same_scene_described

    async def critic(drawing):
        planned = drawing.plan.strip().rsplit("so ", 1)[-1].rstrip(". ")
        viewer = model.session(mode="chat")
        seen = (await viewer.ask("describe the image.", image=drawing.image,
                                 options=TextOptions(max_tokens=64))).text.strip().rstrip(".")
        print(f"   attempt {drawing.attempt}: planned '{planned}', sees '{seen}'")
        if same_scene_described(seen, planned):  # the same shapes, however each sentence opens
            return Accept()
        return Redraw(options=image_options.model_copy(update={"temperature": 1.0, "seed": drawing.attempt}))

    return critic


async def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    async with llada_agent.load(args.model, device=args.device) as model:
        image = ImageOptions(decoder_mode="turbo")
        session = model.session(mode="think")
        critic = caption_critic(model, image) if args.model == "tiny" else True
        agent = ThinkDrawAgent(session, critic=critic, max_redraws=args.redraws,
                               options=ThinkOptions(max_tokens=256, image=image))
        result = await agent.run(args.prompt)
        print(f"plan: {result.reply.thinking}")
        print(f"{len(result.attempts)} attempt(s), accepted: {result.accepted}")
        if result.reply.image is not None and result.reply.image.png is not None:
            print(f"picture -> {result.reply.image.save(out / 'think_draw.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="draw a shape that is round in the color of the sky at the center.")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--redraws", type=int, default=2)
    parser.add_argument("--out", default="out")
    asyncio.run(main(parser.parse_args()))
