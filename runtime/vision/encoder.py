"""The SigLIP-VQ image tokenizer (MODEL_SPEC §7): RGB pixels -> a grid of discrete image codes.

Data path: 16x16 patches -> conv patch embedding + a learned square position table resampled bilinearly to
the image's grid -> pre-LayerNorm transformer blocks (attention stays inside one image) -> 1x1 quant conv ->
the nearest codebook entry by cosine similarity. Tensor names are the checkpoint's, minus its "model." prefix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from runtime.errors import CheckpointError, ImageInputError, MissingTensorsError
from runtime.vision.preprocess import fit_for_editing, fit_for_understanding, resize_cover, to_rgb

# The published preprocessor config normalises with mean = std = 0.5 (MODEL_SPEC §7).
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig:
    """The values of `image_tokenizer/config.json` (+ `preprocessor_config.json`) the tokenizer needs."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    depth: int
    patch_size: int
    image_size: int
    num_codes: int
    code_dim: int
    latent_channels: int
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    attention_bias: bool = True
    image_mean: tuple[float, float, float] = _DEFAULT_MEAN
    image_std: tuple[float, float, float] = _DEFAULT_STD
    # (width, height) every picture is fitted to, when preprocessor_config.json fixes one ("size": {"height",
    # "width"}); None means the official understanding / editing rules of runtime.vision.preprocess.
    fixed_size: tuple[int, int] | None = None

    @property
    def position_side(self) -> int:
        """Side of the learned square position table (128 for the real 2048 / 16)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> TokenizerConfig:
        """Read the config of the tokenizer folder `folder` (`<root>/image_tokenizer`)."""
        folder = Path(folder)
        raw = _read_json(folder / "config.json")
        vision, vq = raw.get("vision_config", raw), raw.get("vq_config", raw)
        where = folder / "config.json"
        if vision.get("spatial_merge_size", 1) != 1:
            raise CheckpointError(
                f"{where}: spatial_merge_size {vision['spatial_merge_size']} is not supported (1)"
            )
        pre_path = folder / "preprocessor_config.json"
        pre = _read_json(pre_path) if pre_path.is_file() else {}
        for key in ("merge_size", "temporal_patch_size"):
            if pre.get(key, 1) != 1:
                raise CheckpointError(
                    f"{pre_path}: {key} {pre[key]} is not supported (a still image needs 1)"
                )
        config = cls(
            hidden_size=_required(vision, "hidden_size", where),
            intermediate_size=_required(vision, "intermediate_size", where),
            num_heads=_required(vision, "num_heads", where),
            depth=_required(vision, "depth", where),
            patch_size=_required(vision, "patch_size", where),
            image_size=_required(vision, "image_size", where),
            num_codes=_required(vq, "num_embeddings", where),
            code_dim=_required(vq, "embed_dim", where),
            latent_channels=_required(vq, "latent_channels", where),
            in_channels=vision.get("in_channels", 3),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            hidden_act=vision.get("hidden_act", "gelu"),
            attention_bias=vision.get("attention_bias", True),
            image_mean=tuple(pre.get("image_mean", _DEFAULT_MEAN)),
            image_std=tuple(pre.get("image_std", _DEFAULT_STD)),
            fixed_size=_fixed_size(pre, pre_path),
        )
        if config.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"{where}: unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_heads:
            raise CheckpointError(
                f"{where}: hidden_size {config.hidden_size} not divisible by {config.num_heads} heads"
            )
        if config.latent_channels != config.hidden_size:
            raise CheckpointError(
                f"{where}: vq latent_channels {config.latent_channels} must equal "
                f"vision hidden_size {config.hidden_size}"
            )
        if "patch_size" in pre and pre["patch_size"] != config.patch_size:
            raise CheckpointError(
                f"{pre_path}: patch_size {pre['patch_size']} differs from config's {config.patch_size}"
            )
        return config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _required(section: Mapping[str, Any], key: str, where: Path) -> Any:
    if key not in section:
        raise CheckpointError(f"{where}: missing required key {key!r}")
    return section[key]


# --------------------------------------------------------------------------------------------------
# Strict weight loading (shared with the decoder)
# --------------------------------------------------------------------------------------------------


def read_safetensors(
    folder: Path, candidates: Sequence[str] | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Return every tensor of the safetensors weights in `folder` (all shards of an index, else the first of
    `candidates` that exists, else every `*.safetensors` file), read straight onto `device`."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        named = [folder / name for name in candidates or () if (folder / name).is_file()]
        files = named[:1] or sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"missing weight shard {file}")
        state.update(load_file(str(file), device=str(device)))
    return state


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    component: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    checkpoint_name: Callable[[str], str] = lambda name: name,
) -> None:
    """Put exactly the tensors of `state` into `module` (built on the meta device), in `dtype` on `device`.

    Raises `MissingTensorsError` naming missing and unexpected tensors (by `checkpoint_name`, i.e. as the
    files spell them) and `CheckpointError` naming a tensor whose shape differs from the config's.
    """
    expected = module.state_dict()
    missing = [checkpoint_name(k) for k in expected if k not in state]
    unexpected = [checkpoint_name(k) for k in state if k not in expected]
    if missing or unexpected:
        raise MissingTensorsError(component, missing, unexpected)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{component}: tensor {checkpoint_name(name)} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    module.load_state_dict(
        {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()},
        strict=True,
        assign=True,
    )
    module.requires_grad_(False)
    module.eval()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def resample_position_table(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Return the [h*w, D] position embeddings of an h x w grid, in raster order, sampled from a learned
    [S*S, D] table.

    Bilinear sampling at the centres of the target cells (align_corners=False), clamped at the border: the
    table is treated as an S x S picture stretched over the whole image whatever its grid. Computed in fp32.
    """
    side = math.isqrt(table.shape[0])
    picture = table.float().view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
    ys = (torch.arange(h, device=table.device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=table.device, dtype=torch.float32) + 0.5) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)  # [1, h, w, (x, y)]
    sampled = F.grid_sample(picture, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[0].flatten(1).t().to(table.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> [h*w, D], patches in raster order."""
        return self.proj(pixels.unsqueeze(0))[0].flatten(1).t()


class Embeddings(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.position_embedding = nn.Embedding(config.position_side**2, config.hidden_size)


class Attention(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D]; key_mask [B, L] (True = a real token of that image) or None when nothing is padded."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

    def forward(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised [C, H, W] images of any sizes -> one [h*w, D] feature tensor per image."""
        tokens = []
        table = self.embeddings.position_embedding.weight
        p = self.patch_embed.proj.stride[0]
        for pixels in images:
            h, w = pixels.shape[1] // p, pixels.shape[2] // p
            tokens.append(self.patch_embed(pixels) + resample_position_table(table, h, w))
        lengths = [len(t) for t in tokens]
        x = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
        key_mask = None
        if len(set(lengths)) > 1:
            key_mask = (
                torch.arange(x.shape[1], device=x.device)[None, :]
                < torch.tensor(lengths, device=x.device)[:, None]
            )
        for block in self.blocks:
            x = block(x, key_mask)
        return [x[i, :n] for i, n in enumerate(lengths)]


class Quantize(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_codes, config.code_dim)


class VQModel(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.quantize = Quantize(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        # Ships in the checkpoint and is loaded so loading stays strict; only a pixel-space VQ decoder would
        # use it, and this model decodes codes with the diffusion decoder instead.
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.latent_channels, 1)

    def codes(self, features: torch.Tensor, unit_codebook: torch.Tensor) -> torch.Tensor:
        """[N, latent] features -> [N] indices of the codebook entries nearest in cosine."""
        z = F.linear(features, self.quant_conv.weight.flatten(1), self.quant_conv.bias)
        # fp32 so that near-ties between codes are decided by the math, not by bf16 rounding.
        z = F.normalize(z.float(), dim=-1)
        return (z @ unit_codebook.t()).argmax(dim=-1)


class SigLipVQ(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.visual = VisionEncoder(config)
        self.vqmodel = VQModel(config)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """One tokenised image: `codes` are raw code values 0..num_codes-1 in raster order over an h x w grid."""

    codes: list[int]
    h: int
    w: int


class ImageTokenizer:
    """Images -> image codes with the SigLIP-VQ tokenizer of an `image_tokenizer/` folder."""

    def __init__(self, config: TokenizerConfig, model: SigLipVQ):
        self.config = config
        self.model = model
        param = model.vqmodel.quantize.embedding.weight
        self.device, self.dtype = param.device, param.dtype
        self._unit_codebook = F.normalize(param.float(), dim=-1)
        self._mean = torch.tensor(config.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(config.image_std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_folder(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ImageTokenizer:
        """Load the tokenizer in `folder` (`<root>/image_tokenizer`) strictly, in `dtype` on `device`."""
        folder = Path(folder)
        config = TokenizerConfig.from_folder(folder)
        state = {_strip_prefix(k): v for k, v in read_safetensors(folder, device=device).items()}
        with torch.device("meta"):
            model = SigLipVQ(config)
        load_state_strict(
            model,
            state,
            "image tokenizer",
            dtype=dtype,
            device=device,
            checkpoint_name=lambda k: "model." + k,
        )
        return cls(config, model)

    @property
    def num_codes(self) -> int:
        """Size of the codebook: codes are 0..num_codes-1."""
        return self.config.num_codes

    @property
    def patch_size(self) -> int:
        """Pixels per grid cell side (16)."""
        return self.config.patch_size

    def fit(self, img: Image.Image, purpose: str = "understanding", *, several: bool = False) -> Image.Image:
        """Return `img` resized and center-cropped the way this tokenizer expects for `purpose`
        ("understanding" or "editing"): the checkpoint's fixed size if it has one, else the official rules."""
        if self.config.fixed_size is not None:
            return resize_cover(img, *self.config.fixed_size)
        if purpose == "editing":
            return fit_for_editing(img)
        if purpose == "understanding":
            return fit_for_understanding(img, several=several)
        raise ValueError(f"purpose must be 'understanding' or 'editing', not {purpose!r}")

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> list[EncodedImage]:
        """Tokenise `images` (any sizes whose sides are multiples of the patch size) in one batch.

        Each image attends only to itself, so a result does not depend on what else is in the batch.
        Non-RGB images are flattened to RGB first (transparency on white).
        """
        pixels, grids = [], []
        p = self.config.patch_size
        for img in images:
            rgb = to_rgb(img)
            if rgb.width % p or rgb.height % p:
                raise ImageInputError(
                    f"image of size {rgb.width}x{rgb.height} is not a multiple of the {p}-pixel patch; "
                    "resize it with fit_for_understanding or fit_for_editing first"
                )
            pixels.append(self._normalise(rgb))
            grids.append((rgb.height // p, rgb.width // p))
        if not pixels:
            return []
        features = self.model.visual(pixels)
        codes = self.model.vqmodel.codes(torch.cat(features), self._unit_codebook).tolist()
        out, start = [], 0
        for h, w in grids:
            out.append(EncodedImage(codes=codes[start : start + h * w], h=h, w=w))
            start += h * w
        return out

    def _normalise(self, rgb: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return ((x - self._mean) / self._std).to(device=self.device, dtype=self.dtype)


def _strip_prefix(name: str) -> str:
    return name.removeprefix("model.")


def _fixed_size(pre: dict, where: Path) -> tuple[int, int] | None:
    size = pre.get("size")
    if not isinstance(size, dict) or not {"height", "width"} <= size.keys():
        return None  # the official file's size holds pixel limits, not a fixed size
    width, height = size["width"], size["height"]
    patch = pre.get("patch_size", 16)
    if not all(isinstance(v, int) and v > 0 and v % patch == 0 for v in (width, height)):
        raise CheckpointError(f"{where}: size {size} must be positive multiples of the {patch}-pixel patch")
    return width, height
