"""Cheap models for tests and demos: random-weight tiny checkpoints with every component, in seconds.

```python
root = write_tiny_model(tmp_path / "tiny")
async with llada_agent.load(root) as model: ...
```
The outputs of a random model are noise, but exact, deterministic noise: enough to test caching,
sessions, events and grammar handling. For outputs that mean something, load the trained "tiny" model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_tiny_model(root: str | Path, *, seed: int = 0, vision: bool = True, **backbone: Any) -> Path:
    """`root`, now a checkpoint folder in the official layout with random tiny weights: backbone and
    tokenizer, and (with `vision`) the image tokenizer, decoders and VAE. `backbone` goes to
    `runtime.testing.checkpoint.write_tiny_checkpoint` (e.g. `config_overrides=`)."""
    from runtime.testing.checkpoint import TINY_IMAGE_CODES, write_tiny_checkpoint

    root = Path(root)
    write_tiny_checkpoint(root, seed=seed, **backbone)
    if vision:
        from runtime.testing.vision import write_tiny_vision_checkpoint

        write_tiny_vision_checkpoint(root, seed=seed, num_codes=TINY_IMAGE_CODES)
    return root
