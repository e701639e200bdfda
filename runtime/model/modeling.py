"""The LLaDA2.0-Uni backbone: a bidirectional MoE transformer whose tensor names match the official checkpoint.

Read top-down, in the order a token meets the modules: RMSNorm, partial rotary embedding, attention (fused
QKV, QK-norm, RoPE, GQA over an explicit boolean mask and an optional cached prefix), the MoE router and
experts, the decoder layer, the model, the LM head. There is no causal mask: the caller passes the
block-causal mask of block diffusion (MODEL_SPEC section 4), or None for full attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from runtime.errors import CheckpointError
from runtime.model.configuration import LLaDA2MoeConfig

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LLaDA2Output:
    """What one forward returns: float32 logits of the asked positions and, on request, the inputs' K/V."""

    logits: torch.Tensor | None
    kv: list[KV] | None = None


def concat_kv(a: list[KV] | None, b: list[KV]) -> list[KV]:
    """Per-layer K/V of `a` followed by `b` along the sequence axis (`a` None means `b` alone)."""
    if a is None:
        return list(b)
    return [(torch.cat([ka, kb], dim=2), torch.cat([va, vb], dim=2)) for (ka, va), (kb, vb) in zip(a, b)]


class LLaDA2MoeRMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in fp32 and scaled in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [B, 1, T, rotary_dim] for NeoX-style RoPE at the given absolute positions."""
    steps = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (steps / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` [B, H, T, D] with NeoX rotate-half RoPE applied to its first cos.shape[-1] dims only."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


class LLaDA2MoeAttention(nn.Module):
    """Multi-head attention with fused QKV, per-head QK-norm before RoPE, and grouped K/V heads."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            bias=config.use_qkv_bias,
        )
        self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: KV | None,
        mask: torch.Tensor | None,
        empty_rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        """Attention output [B, T, hidden] and this call's own (k, v) [B, kv_heads, T, head_dim], k rotated.

        `mask` is additive (0 where a query sees a key, -inf elsewhere) [B, 1, groups*T, P+T] in the grouped-query
        layout built by the model; `empty_rows` [B, T, 1] marks queries that see no key, whose output is forced
        to zero.
        """
        batch, length, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.query_key_value(x).view(batch, length, heads + 2 * kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
        q = apply_partial_rotary(self.query_layernorm(q), cos, sin)
        k = apply_partial_rotary(self.key_layernorm(k), cos, sin)
        v = v.contiguous()
        keys, values = (k, v)
        if prefix is not None:
            keys, values = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        # Fold the query heads sharing one K/V head into the query axis: GQA without copying K/V.
        q = q.reshape(batch, kv_heads, (heads // kv_heads) * length, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5)
        out = out.reshape(batch, heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return self.dense(out), (k, v)


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU feed-forward: the dense layer, each routed expert, and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(
    logits: torch.Tensor,
    expert_bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen experts [N, top_k] (long) and their fp32 weights [N, top_k] from router logits [N, E].

    Sigmoid scores; the bias shifts only the selection. Groups are ranked by the sum of their two best biased
    scores and the top `topk_group` kept; the `top_k` best biased scores inside them are chosen. The weights
    are the chosen *unbiased* scores, renormalised to sum 1, times `scaling`.
    """
    scores = torch.sigmoid(logits.float())
    selection = scores + expert_bias.float()
    num_tokens, num_experts = selection.shape
    grouped = selection.view(num_tokens, n_group, num_experts // n_group)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    kept_groups = group_scores.topk(topk_group, dim=-1).indices
    group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    selection = grouped.masked_fill(~group_kept[..., None], float("-inf")).view(num_tokens, num_experts)
    experts = selection.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * scaling
    return experts, weights


class LLaDA2MoeGate(nn.Module):
    """The router: an fp32 linear scorer plus a selection-only `expert_bias` that stays fp32 under casts."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.top_k = config.num_experts_per_tok
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` would round the bias; keep the fp32 original and follow only the device change.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if moved.dtype != torch.float32:
            if bias.is_meta or moved.is_meta:
                self.expert_bias = torch.empty(bias.shape, dtype=torch.float32, device=moved.device)
            else:
                self.expert_bias = bias.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [N, top_k] and fp32 weights [N, top_k] for tokens x [N, hidden]."""
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.expert_bias, self.n_group, self.topk_group, self.top_k, self.scaling)


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed SwiGLU experts plus an always-on shared expert."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(
            LLaDA2MoeMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_experts = LLaDA2MoeMLP(
            config.hidden_size, config.moe_intermediate_size * config.num_shared_experts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        experts, weights = self.gate(tokens)
        # Sort the (token, expert) pairs by expert so each active expert runs once on a contiguous slice.
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=len(self.experts)).tolist()
        routed_in = tokens[order // experts.shape[1]]
        routed_out = torch.empty_like(routed_in)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                routed_out[start : start + count] = expert(routed_in[start : start + count])
                start += count
        # Back to (token, slot) order, then a fixed-order fp32 sum over each token's k slots: unlike an
        # atomic index_add this is deterministic on GPU, and it rounds like the reference code.
        per_slot = torch.empty_like(routed_out)
        per_slot[order] = routed_out
        mixed = (per_slot.view(*experts.shape, -1).float() * weights[..., None]).sum(1)
        return (mixed.to(x.dtype) + self.shared_experts(tokens)).view(shape)


class LLaDA2MoeDecoderLayer(nn.Module):
    """Pre-norm block: attention then a dense (first layers) or MoE feed-forward, each with a residual."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp: nn.Module = LLaDA2MoeMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = LLaDA2MoeSparseMoeBlock(config)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: KV | None,
        mask: torch.Tensor | None,
        empty_rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        attended, kv = self.attention(self.input_layernorm(h), cos, sin, prefix, mask, empty_rows)
        h = h + attended
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, weight init, fp32 router bias on load."""

    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["LLaDA2MoeDecoderLayer"]
    _keep_in_fp32_modules: ClassVar[list[str]] = ["expert_bias"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["expert_bias"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LLaDA2MoeRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.expert_bias)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """Embedding, decoder layers and final norm; returns normed hidden states and each layer's K/V."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        prefix_kv: list[KV] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final-normed hidden states [B, T, hidden] and the per-layer (k, v) of the T inputs."""
        config = self.config
        h = self.word_embeddings(input_ids)
        cos, sin = rotary_cos_sin(position_ids, config.rotary_dim, config.rope_theta, h.dtype)
        mask, empty_rows = self._grouped_mask(attention_mask, h.dtype)
        kv = []
        for i, layer in enumerate(self.layers):
            h, layer_kv = layer(h, cos, sin, None if prefix_kv is None else prefix_kv[i], mask, empty_rows)
            kv.append(layer_kv)
        return self.norm(h), kv

    def _grouped_mask(
        self, mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The boolean mask [B, T, S] as an additive one in the folded GQA layout [B, 1, groups*T, S], and the
        [B, T, 1] rows that see no key.

        A row without any visible key is let see every key (so softmax stays finite) and zeroed afterwards,
        which is what SDPA's boolean-mask semantics give without risking NaN on any backend. The additive form
        is what SDPA turns a boolean mask into; built here once, not once per layer (and again for backward).
        """
        if mask is None:
            return None, None
        batch, length, keys = mask.shape
        empty_rows = ~mask.any(-1, keepdim=True)
        mask = mask | empty_rows
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        grouped = additive[:, None].expand(batch, groups, length, keys).reshape(batch, 1, groups * length, keys)
        return grouped, empty_rows


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """The LLaDA2.0-Uni backbone with its LM head: ids (+ cached prefix K/V) -> fp32 logits (+ K/V)."""

    def __init__(self, config: LLaDA2MoeConfig):
        problems = config.unsupported()
        if problems:
            raise CheckpointError("the backbone config is not supported: " + "; ".join(problems))
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        prefix_kv: list[KV] | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_positions: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> LLaDA2Output:
        """Logits (float32 [B, T', V]) of the asked positions, and the inputs' K/V when `return_kv`.

        input_ids, position_ids: [B, T] (positions absolute, they drive RoPE). prefix_kv: per layer (k, v)
        [B, kv_heads, P, head_dim] of earlier tokens, k already rotated. attention_mask: bool [B, T, P+T],
        True where a query may see a key (keys are the prefix, then the inputs); None lets every query see
        every key. logits_positions: 1-D indices into T shared by all rows; None means all T; an empty
        tensor skips the head (logits None).
        """
        h, kv = self.model(input_ids, position_ids, prefix_kv, attention_mask)
        logits = None
        if logits_positions is None or logits_positions.numel():
            if logits_positions is not None:
                h = h[:, logits_positions]
            logits = self.lm_head(h).float()
        return LLaDA2Output(logits=logits, kv=kv if return_kv else None)
