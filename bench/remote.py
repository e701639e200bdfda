"""The 8-turn visual conversation of bench/multiturn.py over HTTP: a remote session against a stateless
OpenAI client, each talking to its own `llada-agent serve` server on loopback.

- The session client is `llada_agent.load(url)`: its history stays on the server as exact ids, whose prefix
  cache serves them, so each turn sends only the new message and computes only its new blocks.
- The stateless client is what today's only server for this model offers: every turn re-sends the whole
  conversation to `POST /v1/chat/completions` (pictures as data URIs, answers as text), and its server
  keeps no cache across requests (`cache=False`), so it reads the pictures and prefills the history again.

Both servers run the same random-weight checkpoint (the real architecture, small) in this process, one at a
time, with a fixed answer length. Prints a line per turn, then one final JSON line:

    {"turn8_speedup": x, "total_speedup": y, "cache_hit_ratio": z, ...}

    python bench/remote.py [--quick]
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llada_agent
from bench.multiturn import PICTURE_TURNS, QUESTIONS, arguments, picture, summary, write_checkpoint
from llada_agent import TextOptions
from llada_agent.server import create_app
from llada_agent.testing import serving


def openai_content(content: list) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                      + base64.b64encode(part.png).decode()}}
            if isinstance(part, llada_agent.ImagePart) else {"type": "text", "text": part} for part in content]


async def with_session(url: str, contents: list[list], options: TextOptions) -> list[dict]:
    turns = []
    async with llada_agent.load(url) as model:
        session = model.session(mode="chat")
        for content in contents:
            start = time.perf_counter()
            reply = await session.send(content, task="chat", options=options)
            turns.append({"s": time.perf_counter() - start, "prompt_tokens": reply.usage.prompt_tokens,
                          "cached_tokens": reply.usage.cached_tokens})
    return turns


def stateless(url: str, contents: list[list], options: TextOptions) -> list[dict]:
    turns, history = [], []
    with httpx.Client(base_url=url, timeout=None) as http:
        for content in contents:
            history.append({"role": "user", "content": openai_content(content)})
            start = time.perf_counter()
            response = http.post("/v1/chat/completions", json={
                "messages": history, "max_tokens": options.max_tokens, "dllm_steps": options.steps})
            response.raise_for_status()
            body = response.json()
            turns.append({"s": time.perf_counter() - start, "prompt_tokens": body["usage"]["prompt_tokens"]})
            history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return turns


def main() -> None:
    args = arguments(__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    contents = [[picture(turn, args.picture), question] if turn in PICTURE_TURNS else [question]
                for turn, question in enumerate(QUESTIONS)]
    # Random weights never stop early: a fixed answer length keeps both clients doing equal work (the
    # stateless server's defaults for the rest: threshold decoding would stop at the same length here).
    options = TextOptions(max_tokens=args.answer, steps=8)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_checkpoint(root, args.hidden, args.layers)
        with serving(create_app(llada_agent.load(root))) as url:
            session = asyncio.run(with_session(url, contents, options))
        with serving(create_app(llada_agent.load(root, cache=False))) as url:
            plain = stateless(url, contents, options)

    turns = [{**mine, "session_s": mine["s"], "stateless_s": theirs["s"]} for mine, theirs in zip(session, plain)]
    for number, turn in enumerate(turns, start=1):
        print(f"turn {number}: prompt {turn['prompt_tokens']:5d} tokens ({turn['cached_tokens']:5d} cached)  "
              f"session {turn['session_s']:6.2f} s  stateless {turn['stateless_s']:6.2f} s")
    print(json.dumps({**summary(turns, args), "stateless_turn8_prompt_tokens": plain[-1]["prompt_tokens"]}))


if __name__ == "__main__":
    main()
