"""Reading a Hugging Face checkpoint directory: `config.json` + `model.safetensors` or a sharded
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped files, so a
node that holds layers 10-19 never reads the bytes of any other layer.

Every problem is a `CheckpointError` whose message names the file and tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..kernels.formats import AffineScales
from ..spec.config import ConfigError, ModelArgs, args_from_dict, load_config
from ..spec.layout import EXPERT_TENSOR, mlx_module, split_kv_b_shapes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPE = torch.float8_e4m3fn


class CheckpointError(ValueError):
    """A checkpoint this engine cannot load; the message names the file and tensor."""


def fingerprint(path: str | Path) -> str:
    """Identifies a checkpoint by its config and tensor index (names, dtypes, shapes, offsets), not its bytes:
    cheap to compute on every node, and two copies of one download agree."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    index = path / "model.safetensors.index.json"
    files = [index] if index.exists() else sorted(path.glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            head = f.read(8)
            digest.update(head)
            if file.suffix == ".safetensors":  # the JSON header describes every tensor
                digest.update(f.read(int.from_bytes(head, "little")))
            else:
                digest.update(f.read())
    return digest.hexdigest()


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

    def _locate(self, name: str) -> tuple[str, int | None] | None:
        """Where `name` is stored: (stored name, index along its first dim or None). mlx-lm stacks the routed
        experts of a layer as `mlp.switch_mlp.<proj>.<part>` [n_routed, ...]; expert e is row e of that."""
        if name in self.weight_map:
            return name, None
        m = EXPERT_TENSOR.match(name)
        if m:
            stacked = f"{m['pre']}switch_mlp.{m['proj']}.{m['part']}"
            if stacked in self.weight_map:
                return stacked, int(m["expert"])
        return None

    def has(self, name: str) -> bool:
        return self._locate(name) is not None

    def _file(self, name: str) -> str:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: checkpoint is missing tensor '{name}'")
        return file

    def read_raw(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor of any dtype (packed uint32 weights too), checking its shape (when given) before any
        data is touched. Routed experts stacked by mlx-lm are read by their Hugging Face names."""
        stored, index = self._locate(name) or (name, None)
        file = self._file(stored)
        handle = self._open(file)
        if stored not in handle.keys():
            raise CheckpointError(f"{self.path / file}: index maps '{stored}' here but the file does not contain it")
        stack = handle.get_slice(stored)
        actual = tuple(stack.get_shape())
        if index is not None:
            if index >= actual[0]:
                raise CheckpointError(f"{self.path / file}: '{stored}' stacks {actual[0]} experts, so '{name}' is missing")
            actual = actual[1:]
        if shape is not None and actual != tuple(shape):
            where = name if index is None else f"{name}' (row {index} of '{stored})"
            raise CheckpointError(
                f"{self.path / file}: tensor '{where}' has shape {list(actual)}, expected {list(shape)} from config.json"
            )
        try:
            return handle.get_tensor(stored) if index is None else stack[index]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path / file}: cannot read tensor '{stored}' ({e})") from None

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one float tensor, checking its shape (when given) before any data is touched."""
        tensor = self.read_raw(name, shape)
        if tensor.dtype not in FLOAT_DTYPES + (FP8_DTYPE,):
            stored = (self._locate(name) or (name,))[0]
            raise CheckpointError(
                f"{self.path / self._file(stored)}: tensor '{name}' has dtype {tensor.dtype}, expected a float type")
        return tensor

    def read_linear(self, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, Scales]:
        """A linear weight `name` ([out, in]) and what dequantizes it: None for a float weight; for FP8 its block
        scales `<stem>.weight_scale_inv`; for the MLX affine format (packed uint32 `weight`) its `<stem>.scales`
        and `<stem>.biases`."""
        stem = name.removesuffix("weight")
        if self.has(stem + "scales"):
            return self._read_affine(name, shape)
        weight = self.read(name, shape)
        if weight.dtype != FP8_DTYPE:
            return weight, None
        block = self.args.fp8_block
        if block is None:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' is float8_e4m3fn but config.json has no "
                "quantization_config.weight_block_size")
        scale_name = stem + "weight_scale_inv"
        if not self.has(scale_name):
            raise CheckpointError(f"{self.path}: FP8 tensor '{name}' has no block scales '{scale_name}'")
        scale_shape = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        scale = self.read(scale_name, scale_shape)
        if scale.dtype != torch.float32:
            raise CheckpointError(f"{self.path}: '{scale_name}' has dtype {scale.dtype}, expected float32")
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{self.path}: '{scale_name}' holds non-finite scales")
        return weight, scale

    def _read_affine(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, AffineScales]:
        """A packed MLX affine weight of logical shape [..., out, in]; bits and group size follow from the stored
        shapes (as mlx-lm infers them) and must agree with config.json's `quantization`."""
        stem, quant = name.removesuffix("weight"), self.args.affine
        if quant is None:
            raise CheckpointError(f"{self.path}: '{stem}scales' is present but config.json has no 'quantization' "
                                  "entry (the MLX affine format)")
        *lead, out, inp = shape
        weight = self.read_raw(name, None)
        if weight.dtype != torch.uint32 or tuple(weight.shape[:-1]) != (*lead, out) or (weight.shape[-1] * 32) % inp:
            raise CheckpointError(f"{self.path}: '{name}' is {weight.dtype} {list(weight.shape)}; a packed MLX affine "
                                  f"weight of shape {list(shape)} is uint32 [{', '.join(map(str, (*lead, out)))}, in*bits/32]")
        bits = weight.shape[-1] * 32 // inp
        scales = self.read_raw(stem + "scales", None)
        groups = scales.shape[-1] if scales.dim() else 0
        if tuple(scales.shape[:-1]) != (*lead, out) or not groups or inp % groups or scales.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: '{stem}scales' is {scales.dtype} {list(scales.shape)}; expected a "
                                  f"float tensor [{', '.join(map(str, (*lead, out)))}, in/group_size] for '{name}'")
        group = inp // groups
        biases = self.read_raw(stem + "biases", tuple(scales.shape))
        if biases.dtype != scales.dtype:
            raise CheckpointError(f"{self.path}: '{stem}biases' is {biases.dtype} but '{stem}scales' is {scales.dtype}")
        expected = quant.for_module(mlx_module(stem[:-1]))
        if expected is None:
            raise CheckpointError(f"{self.path}: '{name}' is quantized but config.json's quantization lists "
                                  f"'{mlx_module(stem[:-1])}' as unquantized")
        if (bits, group) != expected:
            raise CheckpointError(
                f"{self.path}: '{name}' and '{stem}scales' hold {bits}-bit values in groups of {group}, but config.json's "
                f"quantization says {expected[0]}-bit in groups of {expected[1]}")
        for part, t in (("scales", scales), ("biases", biases)):
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{self.path}: '{stem}{part}' holds non-finite values")
        return weight, AffineScales(scales, biases, bits, group)

    def read_split_kv_b(self, prefix: str) -> tuple[tuple[torch.Tensor, Scales], tuple[torch.Tensor, Scales]] | None:
        """MLA's kv_b_proj as mlx-lm stores it (and `moemesh quantize` writes it when quantizing attention), or
        None where the checkpoint has kv_b_proj whole: `embed_q` [heads, kv_lora, nope] (the key half, transposed)
        and `unembed_out` [heads, v, kv_lora], each dense or affine-packed, as stored."""
        if self.has(prefix + "kv_b_proj.weight") or not self.has(prefix + "embed_q.weight"):
            return None
        halves = split_kv_b_shapes(self.args)
        return tuple(self._read_affine(prefix + name, shape) if self.has(prefix + name.removesuffix("weight") + "scales")
                     else (self.read(prefix + name, shape), None) for name, shape in halves.items())


Scales = torch.Tensor | AffineScales | None  # FP8 block scales, MLX affine scales and biases, or none
