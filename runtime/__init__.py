"""The engine of llada-agent: a native PyTorch LLaDA2.0-Uni (backbone, tokens, block diffusion, caches, vision).

Nothing here imports `llada_agent`; it speaks token ids, tensors and plain dataclasses.
"""
