"""Random-weight tiny vision checkpoints (tokenizer, SigVQ, both decoders, VAE) in the official layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from safetensors.torch import save_file
from torch import nn

from runtime.vision.decoder import SigVQEmbedder, to_checkpoint_name
from runtime.vision.encoder import SigLipVQ, TokenizerConfig

TOKENIZER_WEIGHTS = "image_tokenizer.safetensors"
DECODER_WEIGHTS = "model.safetensors"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_tokenizer_config(*, num_codes: int = 64, **overrides: Any) -> dict[str, Any]:
    """An `image_tokenizer/config.json` dict: hidden 32, depth 2, heads 2, an 8x8 position table."""
    config = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "depth": 2,
            "patch_size": 16,
            "image_size": 128,
            "in_channels": 3,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "attention_bias": True,
            "spatial_merge_size": 1,
        },
        "vq_config": {"num_embeddings": num_codes, "embed_dim": 16, "latent_channels": 32},
    }
    for key, value in overrides.items():
        section = "vq_config" if key in config["vq_config"] else "vision_config"
        config[section][key] = value
    return config


def tiny_preprocessor_config() -> dict[str, Any]:
    """An `image_tokenizer/preprocessor_config.json` dict with the real normalisation (mean = std = 0.5)."""
    return {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 1,
        "merge_size": 1,
    }


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    """A `decoder/config.json` dict of a Z-Image transformer: dim 64, 2 heads of 32 (rope axes 8+12+12)."""
    config: dict[str, Any] = {
        "_class_name": "ZImageTransformer2DModel",
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": 64,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 32,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [8, 12, 12],
        "axes_lens": [1024, 256, 256],
    }
    config.update(overrides)
    return config


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """A `vae/config.json` dict of an 8x AutoencoderKL (4 blocks of 4 channels) with FLUX's latent scaling."""
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [4, 4, 4, 4],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 2,
        "act_fn": "silu",
        "sample_size": 64,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    }
    config.update(overrides)
    return config


def random_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 values for every tensor of `module`, scaled so activations stay O(1).

    Matrices get 1/sqrt(fan_in) gaussians, norm weights scatter around 1, biases and other vectors are small:
    no tensor keeps an identity or zero init (which would hide a mis-loaded or unused tensor).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in sorted(module.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.dim() >= 2:
            state[name] = noise / max(1, tensor[0].numel()) ** 0.5
        elif "norm" in name and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = 0.05 * noise
    return state


def write_tiny_vision_checkpoint(
    root: str | Path,
    *,
    seed: int = 0,
    num_codes: int = 64,
    sigvq_dim: int = 32,
    tokenizer: dict[str, Any] | None = None,
    transformer: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
) -> Path:
    """Write `image_tokenizer/`, `decoder/`, `decoder-turbo/` and `vae/` under `root`; return `root`.

    File names and tensor names are the real checkpoint's: the tokenizer's tensors carry the "model." prefix,
    the decoders name their caption embedder `semantic_embedder.*`, SigVQ is a torch pickle. `tokenizer`,
    `transformer` and `vae` override keys of the tiny configs; the transformer's cap_feat_dim is `sigvq_dim`.
    """
    root = Path(root)
    seeds = iter(range(seed * 10, seed * 10 + 10))

    folder = _mkdir(root / "image_tokenizer")
    tok_config = tiny_tokenizer_config(num_codes=num_codes, **(tokenizer or {}))
    _write_json(folder / "config.json", tok_config)
    _write_json(folder / "preprocessor_config.json", tiny_preprocessor_config())
    with torch.device("meta"):
        encoder = SigLipVQ(TokenizerConfig.from_folder(folder))
    state = random_state(encoder, next(seeds))
    save_file({"model." + k: v.contiguous() for k, v in state.items()}, str(folder / TOKENIZER_WEIGHTS))
    with torch.device("meta"):
        sigvq = SigVQEmbedder(num_codes, sigvq_dim, sigvq_dim)
    torch.save(random_state(sigvq, next(seeds)), folder / "sigvq_embedding.pt")

    tf_config = tiny_transformer_config(cap_feat_dim=sigvq_dim, **(transformer or {}))
    for name in ("decoder", "decoder-turbo"):
        folder = _mkdir(root / name)
        _write_json(folder / "config.json", tf_config)
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**{k: v for k, v in tf_config.items() if not k.startswith("_")})
        state = random_state(model, next(seeds))
        save_file({to_checkpoint_name(k): v for k, v in state.items()}, str(folder / DECODER_WEIGHTS))

    folder = _mkdir(root / "vae")
    vae_config = tiny_vae_config(**(vae or {}))
    _write_json(folder / "config.json", vae_config)
    with torch.device("meta"):
        model = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    save_file(random_state(model, next(seeds)), str(folder / VAE_WEIGHTS))
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
