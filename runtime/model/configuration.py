"""The backbone config of LLaDA2.0-Uni (model_type "llada2_moe"); defaults are the real checkpoint's values."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    """Hyper-parameters of the LLaDA2.0-Uni MoE backbone, as read from the checkpoint's config.json.

    Keys the real config.json may carry that this class does not name (auto_map, dropouts, ...) are kept as
    plain attributes. `score_function`, `moe_router_enable_expert_bias`, `router_dtype` and `norm_head` are
    absent from the real file; their defaults are the behaviour of the reference code, and the model refuses
    any other value rather than silently computing something else.
    """

    model_type = "llada2_moe"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 173568,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int = 128,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        use_qk_norm: bool = True,
        norm_head: bool = False,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 600000.0,
        partial_rotary_factor: float = 0.5,
        max_position_embeddings: int = 8192,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        moe_intermediate_size: int = 512,
        first_k_dense_replace: int = 1,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        router_dtype: str = "fp32",
        image_token_offset: int = 157184,
        initializer_range: float = 0.02,
        pad_token_id: int = 156892,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_qk_norm = use_qk_norm
        self.norm_head = norm_head
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.max_position_embeddings = max_position_embeddings
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.router_dtype = router_dtype
        self.image_token_offset = image_token_offset
        self.initializer_range = initializer_range
        if kwargs.get("rope_scaling", 0) is None:
            # The real config.json says `"rope_scaling": null`; transformers 5 warns on the key, and null adds nothing.
            del kwargs["rope_scaling"]
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def rotary_dim(self) -> int:
        """The number of leading head dims RoPE rotates (the rest pass through unrotated)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_image_codes(self) -> int:
        """How many image-code ids follow the text vocabulary."""
        return self.vocab_size - self.image_token_offset

    def unsupported(self) -> list[str]:
        """Every way this config departs from what the native backbone computes (empty when it fits)."""
        problems = []
        fixed = {
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "router_dtype": "fp32",
            "norm_head": False,
            "use_qk_norm": True,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        }
        for key, wanted in fixed.items():
            if getattr(self, key, wanted) != wanted:
                problems.append(f"{key}={getattr(self, key)!r} (only {wanted!r} is implemented)")
        rope_kind = _rope_type(self)
        if rope_kind != "default":
            problems.append(f"rope type {rope_kind!r} (only plain RoPE is implemented)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            problems.append(f"rotary dims {self.rotary_dim} must be even and within head_dim={self.head_dim}")
        if self.num_experts % self.n_group:
            problems.append(f"num_experts={self.num_experts} is not a multiple of n_group={self.n_group}")
        elif self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            problems.append(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of the "
                f"topk_group={self.topk_group} kept groups"
            )
        if not 0 < self.topk_group <= self.n_group:
            problems.append(f"topk_group={self.topk_group} must be within 1..n_group={self.n_group}")
        if not 0 <= self.image_token_offset <= self.vocab_size:
            problems.append(
                f"image_token_offset={self.image_token_offset} exceeds vocab_size={self.vocab_size}"
            )
        return problems


def _rope_type(config: PretrainedConfig) -> str:
    # transformers 5 folds rope_theta/rope_scaling into `rope_parameters`; 4.x keeps `rope_scaling` (None = plain).
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type")) or "default"
