"""Resolving checkpoint sources and loading the backbone strictly from the official safetensors layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModel

from runtime import checkpoint
from runtime.checkpoint import load_backbone, load_config, resolve_source
from runtime.errors import CheckpointError, MissingTensorsError
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from runtime.testing.checkpoint import random_backbone_state, tiny_backbone_config, write_tiny_checkpoint


def reference_model(dtype: torch.dtype, seed: int = 0) -> LLaDA2MoeModelLM:
    """The in-memory model a tiny checkpoint should load as: the same weights, rounded through `dtype`."""
    config = LLaDA2MoeConfig(**tiny_backbone_config())
    state = random_backbone_state(config, seed)
    model = LLaDA2MoeModelLM(config).eval()
    rounded = {name: t if "expert_bias" in name else t.to(dtype).float() for name, t in state.items()}
    model.load_state_dict(rounded)
    return model


def logits_of(model: LLaDA2MoeModelLM) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, torch.arange(8).expand(2, 8)).logits


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_backbone_matches_the_in_memory_model(tmp_path: Path, shards: int, dtype: torch.dtype):
    write_tiny_checkpoint(tmp_path, dtype=dtype, shards=shards, tokenizer=False)
    loaded = load_backbone(tmp_path)
    assert not loaded.training
    assert torch.equal(logits_of(loaded), logits_of(reference_model(dtype)))


def test_shards_without_an_index_are_found_by_name(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2, tokenizer=False)
    (tmp_path / "model.safetensors.index.json").unlink()
    assert torch.equal(logits_of(load_backbone(tmp_path)), logits_of(reference_model(torch.float32)))


def test_loading_in_bf16_keeps_the_router_bias_fp32(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, tokenizer=False)
    model = load_backbone(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    bias = model.model.layers[1].mlp.gate.expert_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, reference_model(torch.float32).model.layers[1].mlp.gate.expert_bias)
    reference = logits_of(reference_model(torch.float32))
    torch.testing.assert_close(logits_of(model), reference, atol=0.3, rtol=0.1)


def test_auto_model_loads_the_folder_without_remote_code(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, tokenizer=False)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, LLaDA2MoeModelLM)
    torch.testing.assert_close(logits_of(model.eval()), logits_of(reference_model(torch.float32)))


def test_a_dropped_tensor_is_named(tmp_path: Path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    write_tiny_checkpoint(tmp_path, tokenizer=False, drop=[name])
    with pytest.raises(MissingTensorsError, match=r"missing 1 tensor\(s\): " + re.escape(name)):
        load_backbone(tmp_path)


def test_an_unexpected_tensor_is_named(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, tokenizer=False, shards=2, extra=["model.layers.0.mlp.gate.expert_bias"])
    with pytest.raises(MissingTensorsError, match=r"unexpected 1 tensor\(s\): model\.layers\.0\.mlp\.gate\."):
        load_backbone(tmp_path)


def test_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, tokenizer=False, extra={"model.norm.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint \[3\] vs model \[64\]"):
        load_backbone(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_backbone_config()))
    with pytest.raises(CheckpointError, match="no backbone weights"):
        load_backbone(tmp_path)


def test_load_config_keeps_unknown_keys_and_refuses_other_models(tmp_path: Path):
    config = tiny_backbone_config(auto_map={"AutoConfig": "x.Config"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_config(tmp_path).auto_map == {"AutoConfig": "x.Config"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_config(tmp_path)


def test_resolve_source_accepts_a_checkpoint_folder(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == tmp_path.resolve()


def test_resolve_source_refuses_a_folder_without_config(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_source(tmp_path)


def test_resolve_source_refuses_a_missing_local_path(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_source(tmp_path / "absent" / "deeper")


@pytest.mark.parametrize("url", ["http://localhost:8000", "https://example.org/v1"])
def test_a_server_url_is_refused_with_what_to_do_instead(url: str):
    with pytest.raises(CheckpointError, match="is a URL.*OpenAI-compatible client"):
        resolve_source(url)


def test_tiny_source_says_when_the_bundled_checkpoint_is_not_built(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TINY_CHECKPOINT", tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="tiny checkpoint is not built"):
        resolve_source("tiny")


def test_hub_id_download_failure_is_a_checkpoint_error(monkeypatch):
    def offline(**_: object) -> str:
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not download 'owner/name'.*network unreachable"):
        resolve_source("owner/name")


def test_hub_id_is_fetched_with_snapshot_download(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(tmp_path / repo_id))
    assert resolve_source("owner/name") == tmp_path / "owner" / "name"


def test_writer_includes_the_tiny_tokenizer_by_default(tmp_path: Path):
    pytest.importorskip("runtime.testing.tokenizer")
    write_tiny_checkpoint(tmp_path)
    config = load_config(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert config.vocab_size == config.image_token_offset + config.num_image_codes
    assert load_backbone(tmp_path).config.image_token_offset == config.image_token_offset
