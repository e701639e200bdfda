"""Sampling settings a checkpoint recommends, from `llada_agent.json` in its folder.

Every options class defaults to the official settings of LLaDA2.0-Uni. A checkpoint trained otherwise can
name better values (the bundled tiny model draws best with weaker guidance):

```json
{"decoder_mode": "turbo", "options": {"image": {"cfg_scale": 2.0}, "edit": {"cfg_text_scale": 2.0}}}
```

`decoder_mode` is the decoder `load()` uses when not told.

They fill every field a caller left unset — `ImageOptions(seed=3)` keeps its seed and takes the checkpoint's
guidance — including options nested in others (a thinking turn's `image`). What a caller sets always wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ModelLoadError
from .schemas import DecoderMode, EditOptions, ImageOptions, StoryOptions, TextOptions, ThinkOptions

FILE_NAME = "llada_agent.json"
KINDS: dict[str, type[BaseModel]] = {"text": TextOptions, "think": ThinkOptions, "image": ImageOptions,
                                     "edit": EditOptions, "story": StoryOptions}


@dataclass(frozen=True)
class Recommended:
    """Per options class, the values that replace its defaults."""

    values: dict[type[BaseModel], dict[str, Any]] = field(default_factory=dict)
    decoder_mode: DecoderMode | None = None

    @classmethod
    def from_folder(cls, root: Path) -> Recommended:
        """The recommendations of the checkpoint at `root` (none when it has no file)."""
        path = root / FILE_NAME
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("options", {}), dict):
            raise ModelLoadError(f"{path} must hold an object with an \"options\" object")
        unknown = set(data) - {"options", "decoder_mode"}
        if unknown:
            raise ModelLoadError(f"{path}: unknown keys {sorted(unknown)}")
        decoder_mode = data.get("decoder_mode")
        if decoder_mode not in (None, "normal", "turbo"):
            raise ModelLoadError(f"{path}: decoder_mode must be \"normal\" or \"turbo\", got {decoder_mode!r}")
        values: dict[type[BaseModel], dict[str, Any]] = {}
        for name, given in data.get("options", {}).items():
            kind = KINDS.get(name)
            if kind is None:
                raise ModelLoadError(f"{path}: unknown options {name!r} (known: {', '.join(KINDS)})")
            if not isinstance(given, dict):
                raise ModelLoadError(f"{path}: options {name!r} must be an object")
            try:  # JSON rules: lists stand for tuples, as in a request body
                checked = kind.model_validate_json(json.dumps(given))
            except ValidationError as exc:
                raise ModelLoadError(f"{path}: invalid {name!r} options: {exc.errors()[0]['msg']}") from exc
            values[kind] = {key: getattr(checked, key) for key in given}
        return cls(values, decoder_mode)

    def apply(self, options: Any) -> Any:
        """`options` with each field its caller left unset taken from the recommendation, nested ones too."""
        if not isinstance(options, BaseModel) or not self.values:
            return options
        update = {key: value for key, value in self.values.get(type(options), {}).items()
                  if key not in options.model_fields_set}
        for name in type(options).model_fields:
            inner = getattr(options, name)
            if isinstance(inner, BaseModel) and name not in update:
                applied = self.apply(inner)
                if applied is not inner:
                    update[name] = applied
        return options.model_copy(update=update) if update else options
