"""Stream tensors by name out of a Hugging Face safetensors checkpoint.

A checkpoint is either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read one at a time (memory-mapped by
safetensors), converted to the serving dtype and, for routed experts, copied straight into
one stacked `[local_experts, ...]` buffer per layer: a device reads only the experts it holds.

`bytes_read` counts what was actually read from disk, so callers can prove that a restarted
executor or a new device read nothing from the checkpoint.
"""

from __future__ import annotations

import abc
import json
import logging
import pathlib
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: got {name!r}, expected one of {', '.join(DTYPES)}") from None


class MissingTensorError(KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class Checkpoint:
    """Read-only view over a checkpoint directory's safetensors files."""

    def __init__(self, model_dir: str | pathlib.Path) -> None:
        self.model_dir = pathlib.Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self._file_of = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"model directory {self.model_dir}: neither model.safetensors nor "
                "model.safetensors.index.json found"
            )
        self._handles: dict[pathlib.Path, object] = {}
        self.bytes_read = 0

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, path: pathlib.Path):
        h = self._handles.get(path)
        if h is None:
            h = safe_open(str(path), framework="pt")
            self._handles[path] = h
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the tensor."""
        path = self._file_of.get(name)
        if path is None:
            raise MissingTensorError(f"tensor {name!r} not found in checkpoint {self.model_dir}")
        return tuple(self._handle(path).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise MissingTensorError(f"tensor {name!r} not found in checkpoint {self.model_dir}")
        t = self._handle(path).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._handles.clear()


class WeightSource(abc.ABC):
    """Where a model's tensors come from: the checkpoint (`CheckpointWeights`) or an HMM's
    shared memory (`instance.memory.SharedWeights`).

    `tensor(name)` returns a tensor in the serving dtype; `experts(layer, names)` returns the
    stacked (w13 [E_local, 2I, H], w2 [E_local, H, I]) for the experts this device holds.
    """

    @abc.abstractmethod
    def tensor(self, name: str) -> torch.Tensor: ...

    @abc.abstractmethod
    def experts(
        self, layer: int, names: Callable[[int, int], tuple[str, str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class CheckpointWeights(WeightSource):
    """Tensors read from the checkpoint (host memory) and placed on `device` in `dtype`."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, expert_ids: Sequence[int],
                 device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.expert_ids = list(expert_ids)
        self.device = device

    def tensor(self, name: str) -> torch.Tensor:
        t = self.checkpoint.read(name)
        # A copy either way: the read tensor is a view of the memory-mapped file.
        return t.to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    def experts(self, layer, names):
        w13 = w2 = None
        for local, e in enumerate(self.expert_ids):
            gate_name, up_name, down_name = names(layer, e)
            gate, up, down = (self.checkpoint.read(n) for n in (gate_name, up_name, down_name))
            if w13 is None:
                inter, hidden = gate.shape
                w13 = torch.empty(len(self.expert_ids), 2 * inter, hidden, dtype=self.dtype, device=self.device)
                w2 = torch.empty(len(self.expert_ids), hidden, inter, dtype=self.dtype, device=self.device)
            inter = gate.shape[0]
            w13[local, :inter].copy_(gate)
            w13[local, inter:].copy_(up)
            w2[local].copy_(down)
        assert w13 is not None and w2 is not None, "a device must hold at least one expert"
        return w13, w2
