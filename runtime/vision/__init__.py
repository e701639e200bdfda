"""Pixels <-> image codes: `preprocess` (loading and the resize rules), `encoder` (SigLIP-VQ image tokenizer),
`decoder` (SigVQ + Z-Image transformer + VAE, normal and turbo samplers).

Import the submodules directly: `decoder` pulls in diffusers, which understanding-only work never needs.
"""
