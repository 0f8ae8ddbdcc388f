"""A tree of plain data and tensors saved without pickle: tensors in safetensors, the rest JSON.

What a checkpoint's trainer state holds (optimizer state, RNG states, histories) is such a
tree. Checkpoints live on shared storage that several people and jobs write, so loading one
must not be able to run code: `safetensors` reads only tensors and JSON only data.

In the JSON, a tensor is `{"__tensor__": "<key in the safetensors file>"}` and a mapping whose
keys are not all strings (an optimizer's per-parameter state is keyed by int) is
`{"__items__": [[key, value], ...]}`; tuples come back as lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from amid_ray.atomic import write_bytes_atomic

TENSOR = "__tensor__"
ITEMS = "__items__"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: no shared storage
        return {TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {ITEMS: [[_encode(key, tensors), _encode(item, tensors)]
                        for key, item in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(item, tensors) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a state file: {value!r:.80}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        if set(value) == {ITEMS}:
            return {_decode(key, tensors): _decode(item, tensors) for key, item in value[ITEMS]}
        return {key: _decode(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value


def save_state(state: Any, path: str | Path) -> None:
    """Write `state` as `<path>.json` and `<path>.safetensors` (tensors first: a reader that
    finds the JSON finds its tensors)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    data = json.dumps(_encode(state, tensors))
    tensor_file = path.with_name(path.name + ".safetensors")
    save_file(tensors, str(tensor_file))
    write_bytes_atomic(path.with_name(path.name + ".json"), data.encode())


def load_state(path: str | Path) -> Any:
    """The tree `save_state` wrote at `path`."""
    path = Path(path)
    tensors = load_file(str(path.with_name(path.name + ".safetensors")))
    return _decode(json.loads(path.with_name(path.name + ".json").read_text()), tensors)
