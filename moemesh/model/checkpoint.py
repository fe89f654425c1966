"""Reading a Hugging Face checkpoint directory: `config.json` + `model.safetensors` or a sharded
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped files, so a
node that holds layers 10-19 never reads the bytes of any other layer.

Every problem is a `CheckpointError` whose message names the file and tensor at fault.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ConfigError, ModelArgs, args_from_dict, load_config

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPE = torch.float8_e4m3fn


class CheckpointError(ValueError):
    """A checkpoint this engine cannot load; the message names the file and tensor."""


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.config = load_config(self.path)
        try:
            self.args: ModelArgs = args_from_dict(self.config)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}/{e}") from None
        self._handles: dict[str, object] = {}  # file name -> open memory-mapped safetensors file
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).exists():
                    raise CheckpointError(f"{index}: lists shard '{file}', which is missing from {self.path}")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        weight_map = {}
        for file in files:
            for name in self._open(file.name).keys():
                weight_map[name] = file.name
        return weight_map

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(self.path / file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self.path / file}: cannot read safetensors file ({e}); truncated or corrupt download?"
                ) from None
            self._handles[file] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> str:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: checkpoint is missing tensor '{name}'")
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file(name)).get_slice(name).get_shape())

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor, checking its shape (when given) before any data is touched."""
        file = self._file(name)
        handle = self._open(file)
        if name not in handle.keys():
            raise CheckpointError(f"{self.path / file}: index maps '{name}' here but the file does not contain it")
        actual = tuple(handle.get_slice(name).get_shape())
        if shape is not None and actual != tuple(shape):
            raise CheckpointError(
                f"{self.path / file}: tensor '{name}' has shape {list(actual)}, expected {list(shape)} from config.json"
            )
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path / file}: cannot read tensor '{name}' ({e})") from None
        if tensor.dtype not in FLOAT_DTYPES + (FP8_DTYPE,):
            raise CheckpointError(f"{self.path / file}: tensor '{name}' has dtype {tensor.dtype}, expected a float type")
        return tensor

    def read_linear(self, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A linear weight `name` ([out, in]); for FP8 also its block scales `<stem>.weight_scale_inv`."""
        weight = self.read(name, shape)
        if weight.dtype != FP8_DTYPE:
            return weight, None
        block = self.args.fp8_block
        if block is None:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' is float8_e4m3fn but config.json has no "
                "quantization_config.weight_block_size")
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if not self.has(scale_name):
            raise CheckpointError(f"{self.path}: FP8 tensor '{name}' has no block scales '{scale_name}'")
        scale_shape = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        scale = self.read(scale_name, scale_shape)
        if scale.dtype != torch.float32:
            raise CheckpointError(f"{self.path}: '{scale_name}' has dtype {scale.dtype}, expected float32")
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{self.path}: '{scale_name}' holds non-finite scales")
        return weight, scale
