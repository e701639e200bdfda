"""Random-weight tiny checkpoints of the real LLaDA2.0-Uni backbone architecture, in the official layout."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

TINY_TEXT_VOCAB = 512
TINY_IMAGE_CODES = 64


def tiny_backbone_config(
    *, text_vocab_size: int = TINY_TEXT_VOCAB, num_image_codes: int = TINY_IMAGE_CODES, **overrides: Any
) -> dict[str, Any]:
    """A config.json dict of a small backbone with every feature of the real one.

    A dense first layer then MoE layers, GQA, partial RoPE, grouped routing (2 groups, 1 kept), a shared
    expert; the vocabulary is `text_vocab_size` text ids followed by `num_image_codes` image codes.
    `overrides` replace any key.
    """
    config: dict[str, Any] = {
        "model_type": LLaDA2MoeConfig.model_type,
        "architectures": ["LLaDA2MoeModelLM"],
        "vocab_size": text_vocab_size + num_image_codes,
        "image_token_offset": text_vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "num_shared_experts": 1,
        "moe_intermediate_size": 32,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


def random_backbone_state(config: LLaDA2MoeConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights for every backbone tensor, scaled so activations and logits stay O(1).

    Norm weights scatter around 1 and the router's expert_bias is non-zero, so both take part in the
    computation instead of sitting at their identity values.
    """
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LLaDA2MoeModelLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if name.endswith("expert_bias"):
            state[name] = 0.1 * noise
        elif len(shape) == 1:
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith("word_embeddings.weight"):
            state[name] = noise
        else:
            state[name] = noise * shape[1] ** -0.5
    return state


def write_tiny_checkpoint(
    root: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    config_overrides: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    extra: Mapping[str, torch.Tensor] | Iterable[str] = (),
    tokenizer: bool = True,
) -> Path:
    """`root`, now holding a random-weight tiny backbone (config.json + safetensors) and a tiny text tokenizer.

    Weights are stored in `dtype` (expert_bias always fp32), in one model.safetensors or in `shards` files
    with a model.safetensors.index.json. To test strict loading: `drop` leaves the named tensors out;
    `extra` adds tensors, either names (each gets a small zero tensor) or a mapping of name -> tensor, which
    also replaces a real tensor of the same name. With `tokenizer`, the vocabulary sizes come from the
    tiny tokenizer written next to the weights.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    if tokenizer:
        from runtime.testing.tokenizer import write_tiny_tokenizer

        info = write_tiny_tokenizer(root)
        sizes = {"text_vocab_size": info.text_vocab_size, "num_image_codes": info.num_image_codes}
    config_dict = tiny_backbone_config(**sizes, **dict(config_overrides or {}))
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    state = random_backbone_state(LLaDA2MoeConfig(**config_dict), seed)
    state = {
        name: tensor if name.endswith("expert_bias") else tensor.to(dtype)
        for name, tensor in state.items()
        if name not in set(drop)
    }
    if isinstance(extra, Mapping):
        state.update({name: tensor.contiguous() for name, tensor in extra.items()})
    else:
        state.update({name: torch.zeros(4, dtype=dtype) for name in extra})

    (root / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    _write_weights(root, state, shards)
    return root


def _write_weights(root: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    for stale in [*root.glob("model*.safetensors"), root / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if shards <= 1:
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
