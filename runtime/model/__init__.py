"""The native LLaDA2.0-Uni backbone, registered with transformers' Auto classes for model_type "llada2_moe"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from runtime.model.configuration import LLaDA2MoeConfig
from runtime.model.modeling import (
    KV,
    LLaDA2MoeModelLM,
    LLaDA2Output,
    concat_kv,
    route,
)

# exist_ok: the native classes win even if a transformers release ships its own "llada2_moe".
AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)

__all__ = ["KV", "LLaDA2MoeConfig", "LLaDA2MoeModelLM", "LLaDA2Output", "concat_kv", "route"]
