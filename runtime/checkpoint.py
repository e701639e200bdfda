"""Find a checkpoint folder and load its backbone strictly: every tensor named, every shape checked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.errors import CheckpointError, MissingTensorsError
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

TINY_CHECKPOINT = Path(__file__).resolve().parent / "tiny" / "checkpoint"


def resolve_source(source: str | Path) -> Path:
    """The local folder of a checkpoint named by `source`: "tiny", a local folder, or a Hub id "owner/name".

    A Hub id is fetched with huggingface_hub's `snapshot_download` (which reuses its local cache).
    """
    if str(source) == "tiny":
        if not (TINY_CHECKPOINT / "config.json").is_file():
            raise CheckpointError(
                f"the bundled tiny checkpoint is not built yet (expected {TINY_CHECKPOINT}/config.json); "
                "train it with the runtime.tiny training script or pass a checkpoint folder"
            )
        return TINY_CHECKPOINT
    if str(source).startswith(("http://", "https://")):
        # A URL would otherwise read as a missing local path; say what is and is not possible instead.
        raise CheckpointError(
            f"{source!r} is a URL: load() reads a checkpoint folder, 'tiny' or a Hub id, and does not connect "
            "to a running server; talk to `llada-agent serve` with any OpenAI-compatible client"
        )
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder: it has no config.json")
        return path.resolve()
    if _looks_like_hub_id(str(source)):
        return _download_from_hub(str(source))
    raise CheckpointError(f"no checkpoint folder at {path}, and {str(source)!r} is not a Hub id 'owner/name'")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hub id, but huggingface_hub is not installed "
            "(pip install 'llada-agent[hub]'), or pass a local checkpoint folder"
        ) from exc
    try:
        return Path(snapshot_download(repo_id=repo_id))
    # Offline, unknown repo, gated repo, full disk: each leaves the caller without a folder.
    except Exception as exc:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "check the network and the id, or pass a local checkpoint folder"
        ) from exc


def load_config(root: str | Path) -> LLaDA2MoeConfig:
    """The backbone config read from `root/config.json`."""
    path = Path(root) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != LLaDA2MoeConfig.model_type:
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path} is not a {LLaDA2MoeConfig.model_type!r} config (model_type {found!r})")
    return LLaDA2MoeConfig.from_dict(raw)


def backbone_weight_files(root: str | Path) -> list[Path]:
    """The safetensors files holding the backbone: the index's shards, model.safetensors, or model-*.safetensors."""
    root = Path(root)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is unreadable: {exc}") from exc
        files = [root / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that are not there: {', '.join(absent)}")
        return files
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    shards = sorted(root.glob("model-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"{root} holds no backbone weights (model.safetensors or model-*.safetensors)")


def load_backbone(
    root: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LLaDA2MoeModelLM:
    """The backbone of the checkpoint at `root`, in `dtype` on `device`, in eval mode.

    Strict: any tensor the model needs but the files lack, or the files hold but the model does not know,
    raises MissingTensorsError naming each one; a shape mismatch raises CheckpointError. `expert_bias`
    stays fp32 whatever `dtype` is.
    """
    config = load_config(root)
    files = backbone_weight_files(root)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                found[name] = (file, tuple(handle.get_slice(name).get_shape()))
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise MissingTensorsError("backbone", missing, unexpected)
    mismatched = [
        f"{name}: checkpoint {list(shape)} vs model {list(expected[name])}"
        for name, (_, shape) in sorted(found.items())
        if shape != expected[name]
    ]
    if mismatched:
        raise CheckpointError("backbone tensor shape mismatch: " + "; ".join(mismatched))

    model.to(dtype=dtype)
    model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for file in files:
            # Read tensor by tensor (memory-mapped) so peak host memory stays one tensor, not one shard.
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118
                    targets[name].copy_(handle.get_tensor(name))
    return model.eval()
