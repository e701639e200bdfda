"""Self-contained HTML pages of replies: text, thinking and pictures (embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from .schemas import ImagePart, Reply, TextPart, ThinkingPart

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
.prompt { color: #555; font-style: italic; }
.thinking { color: #666; background: #f6f6f6; padding: .5rem .75rem; border-left: 3px solid #bbb; }
img { image-rendering: pixelated; border: 1px solid #ccc; margin: .5rem 0; max-width: 100%; }
.meta { color: #888; font-size: .8rem; }
"""


def _picture(image: ImagePart) -> str:
    if image.png is None:
        grid = f"{image.grid[0]}x{image.grid[1]}" if image.grid else "?"
        return f'<p class="meta">[image: {grid} codes, not decoded]</p>'
    data = base64.b64encode(image.png).decode()
    width = max(192, (image.pixel_size or (192, 192))[0])
    return f'<img alt="generated picture" width="{width}" src="data:image/png;base64,{data}">'


def reply_html(reply: Reply) -> str:
    """One reply's parts in order, as HTML."""
    out = []
    for part in reply.parts:
        if isinstance(part, ThinkingPart):
            out.append(f'<p class="thinking">{html.escape(part.text)}</p>')
        elif isinstance(part, TextPart):
            out.append(f"<p>{html.escape(part.text)}</p>")
        elif isinstance(part, ImagePart):
            out.append(_picture(part))
    usage = reply.usage
    out.append(f'<p class="meta">{reply.task} · {usage.generated_tokens} tokens generated · '
               f'{usage.cached_tokens} prompt tokens from cache · {usage.forwards} forwards · '
               f'finish: {reply.finish_reason}</p>')
    return "\n".join(out)


def write_page(path: str | Path, title: str, entries: Sequence[tuple[str, Sequence[ImagePart], Reply]]) -> Path:
    """Write a page of (prompt, input pictures, reply) entries; returns the path."""
    sections = []
    for prompt, inputs, reply in entries:
        shown = "".join(_picture(image) for image in inputs)
        sections.append(f'<section><h2 class="prompt">{html.escape(prompt)}</h2>{shown}'
                        f"{reply_html(reply)}</section>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
