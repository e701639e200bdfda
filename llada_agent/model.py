"""`load()` and `Model`: one checkpoint, one engine, sessions on top.

```python
async with llada_agent.load("tiny") as model:
    session = model.session(mode="chat")
    reply = await session.ask("What is in the picture?", image="photo.jpg")
```

The backbone and tokenizer load when the model starts (`async with`, or `await model.start()`), in a
worker thread so the event loop keeps running. The image tokenizer and decoder load on first use, on the
engine's vision thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from typing_extensions import Self

from runtime import errors as rt_errors
from runtime.checkpoint import load_backbone, resolve_source
from runtime.conversation import ConversationFormat, vocab_layout
from runtime.engine import Engine
from runtime.tokens import TokenCodec

from .errors import ImageError, InvalidInputError, ModelClosed, ModelLoadError, wrap
from .prompts import ChatIds, chat_ids
from .recommended import Recommended
from .remote import RemoteModel, is_server_url
from .schemas import CacheInfo, DecoderMode, ImagePart, Task

ImagePurpose = Literal["understanding", "editing"]
logger = logging.getLogger("llada_agent")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def load(
    source: str | Path = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    cache_bytes: int | None = 1 << 30,
    cache: bool = True,
    max_active: int = 16,
    max_queue: int = 256,
    decoder_mode: DecoderMode | None = None,
) -> Model | RemoteModel:
    """A model for `source`: "tiny", a checkpoint folder in the official layout, a Hub id "owner/name", or
    the URL of a llada-agent server ("http://host:8000": a `RemoteModel`, whose sessions run there; the
    other arguments are the server's business and must stay unset).

    Nothing loads until the model starts: use `async with load(...) as model` (or `await model.start()`).
    `dtype` defaults to float32 on CPU and bfloat16 elsewhere; `cache_bytes` bounds the prefix cache (None:
    no bound); `max_active` requests step together in the engine, `max_queue` more may wait;
    `decoder_mode` is the default image decoder ("normal" ~50 steps, "turbo" ~8; None: what the checkpoint
    recommends, else "normal"). A checkpoint's `llada_agent.json` may also recommend sampling settings (see
    `llada_agent.recommended`); options a caller sets always win.
    """
    if is_server_url(source):
        given = {"device": str(device), "dtype": dtype, "cache_bytes": cache_bytes, "cache": cache,
                 "max_active": max_active, "max_queue": max_queue, "decoder_mode": decoder_mode}
        defaults = inspect.signature(load).parameters
        changed = [name for name, value in given.items() if value != defaults[name].default]
        if changed:
            raise InvalidInputError(f"{', '.join(changed)}: set where the model is loaded, on the server "
                                    f"(`llada-agent serve`), not by a client of {source}")
        return RemoteModel(source)
    return Model(source, device=device, dtype=dtype, cache_bytes=cache_bytes, cache=cache,
                 max_active=max_active, max_queue=max_queue, decoder_mode=decoder_mode)


class Model:
    """A loaded checkpoint with its engine: makes sessions, encodes and decodes pictures, reports the cache."""

    def __init__(
        self,
        source: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        cache_bytes: int | None = 1 << 30,
        cache: bool = True,
        max_active: int = 16,
        max_queue: int = 256,
        decoder_mode: DecoderMode | None = None,
    ):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"device {device!r} is not a torch device: {exc}") from exc
        self.dtype = _resolve_dtype(dtype, self.device)
        if decoder_mode not in ("normal", "turbo", None):
            raise InvalidInputError(f"decoder_mode must be 'normal' or 'turbo', got {decoder_mode!r}")
        if cache_bytes is not None and cache_bytes < 0:
            raise InvalidInputError("cache_bytes must be >= 0 or None")
        if max_active < 1 or max_queue < 1:
            raise InvalidInputError("max_active and max_queue must be >= 1")
        self.source = source
        self._asked_decoder_mode = decoder_mode  # the caller's choice; None defers to the checkpoint
        self.decoder_mode: DecoderMode = decoder_mode or "normal"  # until the checkpoint says otherwise
        self.warnings: list[str] = []
        self._engine_args = {"cache_bytes": cache_bytes, "cache_enabled": cache, "max_active": max_active,
                             "max_queue": max_queue}
        self._engine: Engine | None = None
        self._vision_lock = threading.Lock()
        self._image_tokenizer: Any = None
        self._image_decoder: Any = None

    # ----- lifecycle

    async def start(self) -> Self:
        """Load the checkpoint (backbone, tokenizer, chat template) and start the engine; returns self."""
        if self._engine is not None:
            return self
        try:
            await asyncio.to_thread(self._load)
        except rt_errors.RuntimeErrorBase as exc:
            raise wrap(exc) from exc
        return self

    def _load(self) -> None:
        root = resolve_source(self.source)
        backbone = load_backbone(root, dtype=self.dtype, device=self.device)
        codec = TokenCodec.from_pretrained(root)
        pieces, refused = chat_ids(codec, root)
        if refused:
            self.warnings.append(refused)
            logger.warning(refused)
        self.root: Path = root
        self.backbone = backbone
        self.codec = codec
        self.format = ConversationFormat(codec)
        self.chat: ChatIds = pieces
        self.vocab = vocab_layout(codec)
        self.context_length: int = int(getattr(backbone.config, "max_position_embeddings", 8192))
        self._native_grid = _native_grid(root)
        self.recommended = Recommended.from_folder(root)
        self.decoder_mode = self._asked_decoder_mode or self.recommended.decoder_mode or "normal"
        self.fingerprint = _fingerprint(root)
        self._engine = Engine(backbone, self.vocab, **self._engine_args)

    async def close(self) -> None:
        """Stop the engine (running turns end with `ModelClosed`) and drop the vision components."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        self._image_tokenizer = self._image_decoder = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def engine(self) -> Engine:
        """The running engine (raises `ModelClosed` before start or after close)."""
        if self._engine is None:
            raise ModelClosed("the model is not started; use `async with llada_agent.load(...) as model`")
        return self._engine

    @property
    def started(self) -> bool:
        return self._engine is not None

    # ----- sessions and facts

    def session(self, mode: Task = "chat", *, system: str | None = None) -> Any:
        """A new conversation. `mode` picks the system prompt and what `send()` does by default:
        "chat" (answer in text), "draw", "think" (think, then draw), "edit", "story" (text with pictures).
        `system` replaces the mode's system prompt."""
        from .session import Session

        self.engine  # noqa: B018 (fail early when not started)
        return Session(self, mode=mode, system=system)

    @property
    def default_grid(self) -> tuple[int, int]:
        """The grid drawn when none is asked for: the checkpoint's own picture grid when its image tokenizer
        fixes one (the bundled tiny model), else 32x32 (1024 px) when the context allows, else smaller."""
        if self._native_grid is not None:
            return self._native_grid
        side = 32
        while side > 1 and side * side * 4 > self.context_length:
            side //= 2
        return side, side

    @property
    def max_grid(self) -> int:
        """The largest grid side the vocabulary can write."""
        return self.codec.max_grid

    def cache_stats(self) -> CacheInfo:
        """A snapshot of the prefix cache shared by every session of this model."""
        cache = self.engine.cache
        if cache is None:
            return CacheInfo(enabled=False)
        s = cache.stats
        return CacheInfo(enabled=True, lookups=s.lookups, lookup_tokens=s.lookup_tokens, hit_tokens=s.hit_tokens,
                         inserted_tokens=s.inserted_tokens, evicted_nodes=s.evicted_nodes,
                         evicted_tokens=s.evicted_tokens, bytes=s.bytes, nodes=s.nodes,
                         pinned_nodes=s.pinned_nodes, max_bytes=s.max_bytes)

    # ----- pictures

    async def encode_images(self, images: Sequence[ImagePart], purpose: ImagePurpose = "understanding") -> list[ImagePart]:
        """The images as the model reads them: resized for `purpose`, with grid, codes and the resized PNG.

        Parts that already hold codes come back unchanged (a generated image is read by its own codes)."""
        todo = [i for i, part in enumerate(images) if part.codes is None]
        if not todo:
            return list(images)
        pngs = [images[i].png for i in todo]
        several = len(images) > 1
        try:
            encoded = await self.engine.run_vision(self._encode_sync, pngs, purpose, several)
        except rt_errors.RuntimeErrorBase as exc:
            raise wrap(exc) from exc
        out = list(images)
        for i, part in zip(todo, encoded):
            out[i] = part
        return out

    def _encode_sync(self, pngs: list[bytes], purpose: ImagePurpose, several: bool) -> list[ImagePart]:
        from runtime.vision.preprocess import load_image

        tokenizer = self._vision_component("tokenizer")
        pictures = [tokenizer.fit(load_image(png), purpose, several=several) for png in pngs]
        results = tokenizer.encode(pictures)
        parts = []
        for picture, result in zip(pictures, results):
            if max(result.h, result.w) > self.codec.max_grid:
                raise ImageError(f"the image reads as a {result.h}x{result.w} grid; the vocabulary writes at "
                                 f"most {self.codec.max_grid} per side")
            parts.append(ImagePart.from_pil(picture, grid=(result.h, result.w), codes=list(result.codes)))
        return parts

    async def decode_image(self, image: ImagePart, *, mode: DecoderMode | None = None, steps: int | None = None,
                           seed: int | None = None,
                           progress: Callable[[int, int], None] | None = None) -> ImagePart:
        """`image` with its picture decoded from its codes (PNG filled in). `progress(step, total)` is called
        on the vision thread."""
        if image.codes is None or image.grid is None:
            raise ImageError("the image has no codes to decode")
        try:
            png = await self.engine.run_vision(self._decode_sync, image.codes, image.grid, mode or self.decoder_mode,
                                               steps, seed, progress)
        except rt_errors.RuntimeErrorBase as exc:
            raise wrap(exc) from exc
        return image.model_copy(update={"png": png, "sha256": hashlib.sha256(png).hexdigest()})

    def _decode_sync(self, codes: list[int], grid: tuple[int, int], mode: DecoderMode, steps: int | None,
                     seed: int | None, progress: Callable[[int, int], None] | None) -> bytes:
        decoder = self._vision_component("decoder")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        picture = decoder.decode(codes, grid[0], grid[1], mode=mode, steps=steps, generator=generator,
                                 progress=progress)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()

    def _vision_component(self, name: Literal["tokenizer", "decoder"]) -> Any:
        with self._vision_lock:
            if name == "tokenizer" and self._image_tokenizer is None:
                from runtime.vision.encoder import ImageTokenizer

                folder = self.root / "image_tokenizer"
                if not folder.is_dir():
                    raise ModelLoadError(f"{self.root} has no image_tokenizer/ folder: this checkpoint cannot read images")
                self._image_tokenizer = ImageTokenizer.from_folder(folder, dtype=self.dtype, device=self.device)
                if self._image_tokenizer.num_codes != self.codec.num_image_codes:
                    raise ModelLoadError(f"the image tokenizer has {self._image_tokenizer.num_codes} codes, the "
                                         f"backbone vocabulary {self.codec.num_image_codes}")
            if name == "decoder" and self._image_decoder is None:
                from runtime.vision.decoder import ImageDecoder

                self._image_decoder = ImageDecoder(self.root, dtype=self.dtype, device=self.device)
            return self._image_tokenizer if name == "tokenizer" else self._image_decoder


def _native_grid(root: Path) -> tuple[int, int] | None:
    """(h, w) of the picture size the image tokenizer fixes, in codes; None when it follows the official rules."""
    from runtime.vision.encoder import TokenizerConfig

    folder = root / "image_tokenizer"
    if not (folder / "config.json").is_file():
        return None
    config = TokenizerConfig.from_folder(folder)
    if config.fixed_size is None:
        return None
    width, height = config.fixed_size
    return height // config.patch_size, width // config.patch_size


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidInputError(f"dtype must be one of {', '.join(sorted(_DTYPES))} or a torch.dtype, got {dtype!r}")


def _fingerprint(root: Path) -> str:
    """A short digest of the files that fix token ids (config and tokenizer): sessions saved with one
    checkpoint load only into a model whose ids mean the same."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        path = root / name
        digest.update(name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
