"""Image codes -> pixels (MODEL_SPEC §8): SigVQ conditioning, a Z-Image flow-matching transformer, a VAE.

codes [h*w] -> nearest x2 upsample to (2h, 2w) -> SigVQ embedder -> 4hw conditioning tokens (the "caption")
-> diffusers `ZImageTransformer2DModel` integrating a [16, 4h, 4w] latent from noise (t = 0) to data (t = 1)
-> diffusers `AutoencoderKL` (8x) -> a (32h x 32w) RGB picture.

Two samplers: *normal* (decoder/, shifted Euler grid, guidance against an all-zero caption with the norm
clamp) and *turbo* (decoder-turbo/, distilled: unshifted grid, predict the data then re-noise to the next t).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from PIL import Image
from torch import nn

from runtime.errors import CheckpointError, GenerationError
from runtime.vision.encoder import _read_json, load_state_strict, read_safetensors

DecodeMode = Literal["normal", "turbo"]
Progress = Callable[[int, int], None]

DEFAULT_STEPS: dict[str, int] = {"normal": 50, "turbo": 8}
TIME_SHIFT = 6.0
"""The normal grid t/(t + s - s t) spends most steps near the noise end (official time_shifting_factor)."""
GUIDANCE_SCALE = 1.0
"""Normal decoding predicts v_c + g (v_c - v_0) against an all-zero caption, norm clamped to |v_c|."""
PIXELS_PER_CELL = 32
"""One grid cell: a 16 px token, upsampled x2 by the decoder."""
LATENT_PER_CELL = 4
"""Latent cells per grid cell: the x2 code upsample times the transformer's 2x2 latent patches."""

# Weight file names seen for the decoder folders: the official loader reads model.safetensors, the model card
# lists decoder_model.safetensors, diffusers writes diffusion_pytorch_model.safetensors.
_DECODER_FILES = ("model.safetensors", "decoder_model.safetensors", "diffusion_pytorch_model.safetensors")
_VAE_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# The official loader overrides the rope table lengths of the config with these (long enough for a 16384-token
# caption and a 1024 x 1024 latent patch grid).
_ROPE_AXES_LENS = (32768, 1024, 1024)
_SIGVQ_FILE = Path("image_tokenizer") / "sigvq_embedding.pt"
_FOLDERS = {"normal": "decoder", "turbo": "decoder-turbo"}


# --------------------------------------------------------------------------------------------------
# Samplers' time grids (pure)
# --------------------------------------------------------------------------------------------------


def normal_timesteps(steps: int, shift: float = TIME_SHIFT) -> torch.Tensor:
    """Return the `steps` grid points of the normal sampler: linspace(0, 1) shifted towards t = 0.

    Euler over it makes steps - 1 model calls.
    """
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float32)
    return t / (t + shift - shift * t)


def turbo_timesteps(steps: int) -> torch.Tensor:
    """Return the steps + 1 grid points of the turbo sampler: linspace(0, 1), one model call per interval."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# SigVQ embedder
# --------------------------------------------------------------------------------------------------


class _Proj(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Projector(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_Proj(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SigVQEmbedder(nn.Module):
    """Code ids -> conditioning vectors: Embedding -> Linear -> SiLU -> Linear (the checkpoint's names)."""

    def __init__(self, num_codes: int, dim: int, hidden: int):
        super().__init__()
        self.prior_token_embedding = nn.Embedding(num_codes, dim)
        self.prior_projector = _Projector(dim, hidden)

    @property
    def num_codes(self) -> int:
        return self.prior_token_embedding.num_embeddings

    @property
    def dim(self) -> int:
        return self.prior_token_embedding.embedding_dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.prior_projector(self.prior_token_embedding(codes))


def load_sigvq(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> SigVQEmbedder:
    """Load the SigVQ embedder state dict at `path` (a torch pickle read with weights_only=True) strictly."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-weights pickle: unpickling errors have no common base class
        raise CheckpointError(f"{path} is not a loadable state dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    embedding, first = (
        state.get("prior_token_embedding.weight"),
        state.get("prior_projector.net.0.proj.weight"),
    )
    if embedding is None or first is None:
        missing = [
            k for k in ("prior_token_embedding.weight", "prior_projector.net.0.proj.weight") if k not in state
        ]
        raise CheckpointError(f"SigVQ embedder {path}: missing tensor(s) {', '.join(missing)}")
    with torch.device("meta"):
        model = SigVQEmbedder(embedding.shape[0], embedding.shape[1], first.shape[0])
    load_state_strict(model, dict(state), "SigVQ embedder", dtype=dtype, device=device)
    return model


# --------------------------------------------------------------------------------------------------
# Transformer and VAE loading
# --------------------------------------------------------------------------------------------------


def load_transformer(
    folder: Path, cap_feat_dim: int, *, dtype: torch.dtype, device: torch.device | str
) -> ZImageTransformer2DModel:
    """Load the decoder transformer in `folder` strictly, renaming `semantic_embedder.*` to `cap_embedder.*`.

    `cap_feat_dim` is the SigVQ width (the official loader also forces it over the config's value).
    """
    config = _read_json(folder / "config.json")
    accepted = set(inspect.signature(ZImageTransformer2DModel.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise CheckpointError(
            f"{folder / 'config.json'}: unknown key(s) for ZImageTransformer2DModel: {unknown}"
        )
    kwargs["cap_feat_dim"] = cap_feat_dim
    lens = kwargs.get("axes_lens", _ROPE_AXES_LENS)
    kwargs["axes_lens"] = [max(a, b) for a, b in zip(lens, _ROPE_AXES_LENS)] + list(
        lens[len(_ROPE_AXES_LENS) :]
    )
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**kwargs)
    state = {to_diffusers_name(k): v for k, v in read_safetensors(folder, _DECODER_FILES, device).items()}
    load_state_strict(
        model,
        state,
        f"decoder transformer ({folder.name})",
        dtype=dtype,
        device=device,
        checkpoint_name=to_checkpoint_name,
    )
    return model


def to_diffusers_name(name: str) -> str:
    """The diffusers name of a decoder checkpoint tensor (`semantic_embedder.*` is `cap_embedder.*`)."""
    return (
        "cap_embedder." + name.removeprefix("semantic_embedder.")
        if name.startswith("semantic_embedder.")
        else name
    )


def to_checkpoint_name(name: str) -> str:
    """The decoder checkpoint's name of a diffusers tensor name (the inverse of `to_diffusers_name`)."""
    return (
        "semantic_embedder." + name.removeprefix("cap_embedder.")
        if name.startswith("cap_embedder.")
        else name
    )


def load_vae(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> AutoencoderKL:
    """Load the diffusers AutoencoderKL in `folder` strictly; it must downsample 8x (4 blocks)."""
    config = _read_json(folder / "config.json")
    blocks = len(config.get("block_out_channels", ()))
    if blocks != 4:
        raise CheckpointError(
            f"{folder / 'config.json'}: the decoder needs an 8x VAE (4 blocks); "
            f"this one has {blocks} block(s)"
        )
    with torch.device("meta"):
        model = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    load_state_strict(model, read_safetensors(folder, _VAE_FILES, device), "VAE", dtype=dtype, device=device)
    return model


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


class ImageDecoder:
    """Decodes image codes to pictures with the components under a checkpoint root.

    Components (SigVQ, normal and turbo transformers, VAE) load on first use, in `dtype` on `device`, and stay
    resident until `unload`. Safe to call from several threads; loading happens once.
    """

    def __init__(
        self, root: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        self.root = Path(root)
        self.dtype = dtype
        self.device = torch.device(device)
        self._components: dict[str, nn.Module] = {}
        self._lock = threading.Lock()

    # ---- components ------------------------------------------------------------------------------

    def load(self, *names: str) -> None:
        """Load the named components now ("sigvq", "normal", "turbo", "vae"); all four when none are named."""
        for name in names or ("sigvq", "normal", "turbo", "vae"):
            self._component(name)

    def unload(self, *names: str) -> None:
        """Drop the named components (all when none are named); they reload on next use."""
        with self._lock:
            for name in names or tuple(self._components):
                self._components.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the components currently resident."""
        return tuple(self._components)

    def _component(self, name: str) -> nn.Module:
        with self._lock:
            if name not in self._components:
                self._components[name] = self._build(name)
            return self._components[name]

    def _build(self, name: str) -> nn.Module:
        opts = {"dtype": self.dtype, "device": self.device}
        if name == "sigvq":
            return load_sigvq(self.root / _SIGVQ_FILE, **opts)
        if name == "vae":
            return load_vae(self.root / "vae", **opts)
        if name in _FOLDERS:
            sigvq = self._components.get("sigvq") or load_sigvq(self.root / _SIGVQ_FILE, **opts)
            self._components["sigvq"] = sigvq
            model = load_transformer(self.root / _FOLDERS[name], sigvq.dim, **opts)
            vae_channels = _read_json(self.root / "vae" / "config.json").get("latent_channels")
            if vae_channels is not None and vae_channels != model.config.in_channels:
                raise CheckpointError(
                    f"{_FOLDERS[name]} works on {model.config.in_channels} latent channels, "
                    f"the VAE has {vae_channels}"
                )
            return model
        raise ValueError(f"unknown decoder component {name!r}")

    # ---- decoding --------------------------------------------------------------------------------

    @staticmethod
    def output_size(h: int, w: int) -> tuple[int, int]:
        """Return the (width, height) in pixels of the picture decoded from an h x w grid."""
        return w * PIXELS_PER_CELL, h * PIXELS_PER_CELL

    @torch.inference_mode()
    def decode(
        self,
        codes: Sequence[int],
        h: int,
        w: int,
        *,
        mode: DecodeMode = "normal",
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> Image.Image:
        """Return the (32w x 32h) RGB picture of `codes` (raw code values, raster order, h x w grid).

        `mode` "normal" integrates `steps` grid points (default 50: 49 guided model calls); "turbo" runs
        `steps` (default 8) distilled calls. The noise comes from `generator` (same seed, same picture).
        `progress` is called with (step, total) after every model call; an exception it raises aborts.
        """
        if mode not in _FOLDERS:
            raise GenerationError(f"decode mode must be 'normal' or 'turbo', got {mode!r}")
        steps = DEFAULT_STEPS[mode] if steps is None else steps
        if steps < (2 if mode == "normal" else 1):
            raise GenerationError(
                f"{mode} decoding needs at least {2 if mode == 'normal' else 1} steps, got {steps}"
            )
        if h < 1 or w < 1 or len(codes) != h * w:
            raise GenerationError(f"{len(codes)} codes do not fill a {h}x{w} grid")
        sigvq = self._component("sigvq")
        bad = [c for c in codes if not 0 <= c < sigvq.num_codes]
        if bad:
            raise GenerationError(f"image codes must lie in [0, {sigvq.num_codes}); got {bad[:5]}")
        transformer = self._component(mode)
        vae = self._component("vae")

        grid = torch.tensor(list(codes), dtype=torch.long, device=self.device).view(h, w)
        upsampled = grid.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).flatten()
        caption = sigvq(upsampled)
        shape = (transformer.config.in_channels, 1, LATENT_PER_CELL * h, LATENT_PER_CELL * w)
        noise_device = generator.device if generator is not None else self.device

        def draw() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=noise_device).to(self.device)

        model = _Velocity(transformer, self.dtype)
        if mode == "normal":
            latent = _sample_normal(model, caption, draw(), normal_timesteps(steps), progress)
        else:
            latent = _sample_turbo(model, caption, draw, turbo_timesteps(steps), progress)
        return _to_picture(vae, latent[:, 0].unsqueeze(0), self.dtype)


class _Velocity:
    """Calls the transformer on a batch of latents with their captions; returns fp32 velocities."""

    def __init__(self, transformer: ZImageTransformer2DModel, dtype: torch.dtype):
        self.transformer = transformer
        self.dtype = dtype
        self.patch = transformer.config.all_patch_size[0]
        self.f_patch = transformer.config.all_f_patch_size[0]

    def __call__(self, xs: list[torch.Tensor], t: float, captions: list[torch.Tensor]) -> list[torch.Tensor]:
        ts = torch.full((len(xs),), t, dtype=torch.float32, device=xs[0].device)
        out = self.transformer(
            x=[x.to(self.dtype) for x in xs],
            t=ts,
            cap_feats=captions,
            patch_size=self.patch,
            f_patch_size=self.f_patch,
            return_dict=False,
        )[0]
        return [o.float() for o in out]


def _sample_normal(
    model: _Velocity, caption: torch.Tensor, x: torch.Tensor, ts: torch.Tensor, progress: Progress | None
) -> torch.Tensor:
    # Euler over the shifted grid; each call runs the caption and the all-zero caption as one batch of two.
    captions = [caption, torch.zeros_like(caption)]
    total = len(ts) - 1
    for i in range(total):
        cond, uncond = model([x, x], float(ts[i]), captions)
        v = cond + GUIDANCE_SCALE * (cond - uncond)
        cond_norm, v_norm = torch.linalg.vector_norm(cond), torch.linalg.vector_norm(v)
        if v_norm > cond_norm:
            v = v * (cond_norm / v_norm)
        x = x + float(ts[i + 1] - ts[i]) * v
        if progress is not None:
            progress(i + 1, total)
    return x


def _sample_turbo(
    model: _Velocity,
    caption: torch.Tensor,
    draw: Callable[[], torch.Tensor],
    ts: torch.Tensor,
    progress: Progress | None,
) -> torch.Tensor:
    # Each step jumps to the predicted data x1 = x + (1 - t) v, then re-noises it to the next t with fresh
    # noise; the last step lands on t = 1, where no noise is left to draw.
    x = draw()
    total = len(ts) - 1
    for i in range(total):
        t, t_next = float(ts[i]), float(ts[i + 1])
        (v,) = model([x], t, [caption])
        data = x + (1.0 - t) * v
        x = data if t_next >= 1.0 else t_next * data + (1.0 - t_next) * draw()
        if progress is not None:
            progress(i + 1, total)
    return x


def _to_picture(vae: AutoencoderKL, latent: torch.Tensor, dtype: torch.dtype) -> Image.Image:
    shift = vae.config.shift_factor or 0.0
    z = latent / vae.config.scaling_factor + shift
    pixels = vae.decode(z.to(dtype), return_dict=False)[0][0].float()
    unit = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
    array = (unit * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
