"""The native backbone's math: router, MoE dispatch, RoPE, QK-norm, masks, prefix K/V, logits selection."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig

from runtime.errors import CheckpointError
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM, concat_kv, route
from runtime.model.modeling import (
    LLaDA2MoeAttention,
    LLaDA2MoeSparseMoeBlock,
    apply_partial_rotary,
    rotary_cos_sin,
)
from runtime.testing.checkpoint import random_backbone_state, tiny_backbone_config

BLOCK = 4


@pytest.fixture(scope="module")
def config() -> LLaDA2MoeConfig:
    return LLaDA2MoeConfig(**tiny_backbone_config())


@pytest.fixture(scope="module")
def model(config: LLaDA2MoeConfig) -> LLaDA2MoeModelLM:
    model = LLaDA2MoeModelLM(config).eval()
    model.load_state_dict(random_backbone_state(config, seed=0))
    return model


def ids_and_positions(config: LLaDA2MoeConfig, batch: int, length: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    return ids, torch.arange(length).expand(batch, length)


def block_causal(batch: int, queries: int, keys: int, first_query: int = 0) -> torch.Tensor:
    """Bool [batch, queries, keys]: the query at absolute position p sees keys in blocks <= block(p)."""
    q_block = (torch.arange(queries) + first_query) // BLOCK
    k_block = torch.arange(keys) // BLOCK
    return (k_block[None, :] <= q_block[:, None]).expand(batch, queries, keys)


def test_router_matches_the_reference_example():
    experts, weights = route(
        torch.tensor([[3.0, 2.0, 0.0, 0.0]]),
        torch.tensor([-2.0, -2.0, 0.8, 0.2]),
        n_group=2,
        topk_group=1,
        top_k=2,
        scaling=2.5,
    )
    assert sorted(experts[0].tolist()) == [2, 3]
    torch.testing.assert_close(weights, torch.tensor([[1.25, 1.25]]))


def test_router_weights_are_the_unbiased_scores_renormalised():
    logits = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    experts, weights = route(logits, torch.zeros(4), n_group=1, topk_group=1, top_k=2, scaling=2.0)
    assert experts[0].tolist() == [3, 0]
    chosen = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights[0], 2.0 * chosen / chosen.sum())


def test_vectorised_moe_equals_a_per_token_loop(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    block: LLaDA2MoeSparseMoeBlock = model.model.layers[1].mlp
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(3))
    expected = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            experts, weights = block.gate(token[None])
            out = block.shared_experts(token)
            for e, w in zip(experts[0].tolist(), weights[0]):
                out = out + w * block.experts[e](token)
            expected[b, t] = out
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected.detach(), atol=1e-5, rtol=1e-5)


def test_routing_uses_several_experts_on_random_weights(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    x = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(4))
    experts, _ = model.model.layers[1].mlp.gate(x)
    assert len(set(experts.flatten().tolist())) >= 3


def test_partial_rope_rotates_only_the_leading_dims_neox_style():
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)
    cos, sin = rotary_cos_sin(torch.tensor([[1]]), rotary_dim=4, theta=100.0, dtype=torch.float32)
    out = apply_partial_rotary(x, cos, sin)[0, 0, 0]
    # Rotary dims 0..3 pair (0, 2) at frequency 1 and (1, 3) at 100^(-2/4) = 0.1; dims 4..7 pass through.
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.1), math.sin(0.1)
    expected = torch.tensor([1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2, 5, 6, 7, 8])
    torch.testing.assert_close(out, expected)


def test_qk_norm_is_applied_before_rope():
    config = LLaDA2MoeConfig(hidden_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    attention = LLaDA2MoeAttention(config)
    with torch.no_grad():
        attention.query_key_value.weight.copy_(torch.eye(4).repeat(3, 1))
        attention.key_layernorm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    cos, sin = rotary_cos_sin(torch.tensor([[1]]), rotary_dim=2, theta=100.0, dtype=torch.float32)
    _, (k, _) = attention(torch.tensor([[[3.0, 4.0, 0.0, 0.0]]]), cos, sin, None, None, None)
    # rms([3, 4, 0, 0]) = 2.5 -> [1.2, 1.6, 0, 0] * weight -> [1.2, 3.2, 0, 0]; then dims (0, 1) turn by 1 rad.
    c, s = math.cos(1.0), math.sin(1.0)
    expected = torch.tensor([1.2 * c - 3.2 * s, 3.2 * c + 1.2 * s, 0.0, 0.0])
    torch.testing.assert_close(k[0, 0, 0], expected)


def test_block_causal_mask_hides_later_blocks(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 1, 2 * BLOCK)
    changed = ids.clone()
    changed[:, BLOCK:] = (changed[:, BLOCK:] + 1) % config.vocab_size
    mask = block_causal(1, 2 * BLOCK, 2 * BLOCK)
    with torch.no_grad():
        before = model(ids, positions, attention_mask=mask).logits
        after = model(changed, positions, attention_mask=mask).logits
    torch.testing.assert_close(after[:, :BLOCK], before[:, :BLOCK], atol=1e-6, rtol=1e-6)


def test_full_attention_lets_every_block_see_later_ones(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 1, 2 * BLOCK)
    changed = ids.clone()
    changed[:, BLOCK:] = (changed[:, BLOCK:] + 1) % config.vocab_size
    with torch.no_grad():
        before = model(ids, positions).logits
        after = model(changed, positions).logits
    assert (after[:, :BLOCK] - before[:, :BLOCK]).abs().max() > 1e-3


def test_prefix_kv_gives_the_same_logits_as_the_full_window(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    length, prefix = 3 * BLOCK, 2 * BLOCK
    ids, positions = ids_and_positions(config, 2, length)
    with torch.no_grad():
        full = model(ids, positions, attention_mask=block_causal(2, length, length)).logits
        prefix_mask = block_causal(2, prefix, prefix)
        cached = model(ids[:, :prefix], positions[:, :prefix], attention_mask=prefix_mask, return_kv=True).kv
        block = model(
            ids[:, prefix:],
            positions[:, prefix:],
            prefix_kv=cached,
            attention_mask=block_causal(2, BLOCK, length, first_query=prefix),
        ).logits
    torch.testing.assert_close(block, full[:, prefix:], atol=1e-5, rtol=1e-5)


def test_kv_built_block_by_block_equals_kv_of_one_forward(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 1, 2 * BLOCK)
    with torch.no_grad():
        whole = model(ids, positions, attention_mask=block_causal(1, 2 * BLOCK, 2 * BLOCK), return_kv=True).kv
        first = model(ids[:, :BLOCK], positions[:, :BLOCK], return_kv=True).kv
        second = model(ids[:, BLOCK:], positions[:, BLOCK:], prefix_kv=first, return_kv=True).kv
    for (k, v), (k_parts, v_parts) in zip(whole, concat_kv(first, second)):
        assert k.shape == (1, config.num_key_value_heads, 2 * BLOCK, config.head_dim)
        torch.testing.assert_close(k_parts, k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_parts, v, atol=1e-5, rtol=1e-5)


def test_logits_positions_select_rows_of_the_full_logits(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 2, 6)
    chosen = torch.tensor([5, 1, 2])
    with torch.no_grad():
        full = model(ids, positions).logits
        subset = model(ids, positions, logits_positions=chosen).logits
    assert full.dtype == torch.float32
    torch.testing.assert_close(subset, full[:, chosen])


def test_empty_logits_positions_skip_the_head_but_keep_kv(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 1, 4)
    with torch.no_grad():
        out = model(ids, positions, logits_positions=torch.tensor([], dtype=torch.long), return_kv=True)
    assert out.logits is None
    assert len(out.kv) == config.num_hidden_layers


def test_a_query_that_sees_no_key_stays_finite(config: LLaDA2MoeConfig, model: LLaDA2MoeModelLM):
    ids, positions = ids_and_positions(config, 2, 4)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[1, 0] = False
    with torch.no_grad():
        out = model(ids, positions, attention_mask=mask, return_kv=True)
        reference = model(ids[:1], positions[:1]).logits
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in out.kv)
    torch.testing.assert_close(out.logits[:1], reference, atol=1e-5, rtol=1e-5)


def test_expert_bias_stays_fp32_when_the_model_is_cast(config: LLaDA2MoeConfig):
    model = LLaDA2MoeModelLM(config)
    model.model.layers[1].mlp.gate.expert_bias.fill_(0.1234567)
    model.to(torch.bfloat16)
    bias = model.model.layers[1].mlp.gate.expert_bias
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert bias.dtype == torch.float32
    assert bias[0].item() == pytest.approx(0.1234567, abs=1e-7)


def test_init_gives_unit_norms_and_zero_expert_bias(config: LLaDA2MoeConfig):
    model = LLaDA2MoeModelLM(config)
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))
    assert torch.equal(model.model.layers[2].mlp.gate.expert_bias, torch.zeros(config.num_experts))
    assert model.lm_head.weight.std().item() == pytest.approx(config.initializer_range, rel=0.1)


def test_config_defaults_are_the_real_checkpoint_values():
    config = LLaDA2MoeConfig(auto_map={"AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM"})
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (173568, 2048, 20)
    assert (config.num_experts, config.num_experts_per_tok) == (256, 8)
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (8, 4, 2.5)
    assert (config.rotary_dim, config.image_token_offset, config.pad_token_id) == (64, 157184, 156892)
    assert config.num_image_codes == 16384
    assert config.unsupported() == []


def test_model_type_is_registered_with_auto_config():
    assert isinstance(AutoConfig.for_model("llada2_moe"), LLaDA2MoeConfig)


def test_unsupported_config_is_refused_with_the_reason():
    config = LLaDA2MoeConfig(**tiny_backbone_config(score_function="softmax"))
    with pytest.raises(CheckpointError, match="score_function"):
        LLaDA2MoeModelLM(config)
