"""Weight buckets: many named tensors packed into one flat byte buffer, the layout SGLang's
`FlattenedTensorBucket` (load_format="flattened_bucket") reconstructs.

Layout: tensors are laid end to end as raw bytes (row-major, no padding) in a uint8 tensor; for each one the
metadata holds (name, shape, dtype, start byte, end byte, byte count). `BucketBuilder` writes tensors straight into a
reused buffer, so streaming a whole model costs one bucket plus the one tensor being added, never a second copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a bucket (field names follow SGLang's FlattenedTensorMetadata)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int  # bytes, as SGLang counts them in its flattened uint8 view


@dataclass
class WeightBucket:
    """A flat uint8 buffer [bytes] and the metadata of the tensors in it."""

    flat: torch.Tensor
    metadata: list[TensorMeta]

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Zero-copy views of the tensors, in insertion order."""
        out = []
        for m in self.metadata:
            view = self.flat[m.start_idx : m.end_idx].view(m.dtype).view(m.shape)
            out.append((m.name, view))
        return out

    def checksums(self) -> dict[str, str]:
        """sha256 of each tensor's bytes, for verifying what an engine holds against what was sent."""
        return {m.name: tensor_checksum(t) for m, (_, t) in zip(self.metadata, self.named_tensors())}


def tensor_checksum(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and shape included), independent of where it lives."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def stream_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Pack a stream of (name, tensor) into buckets of at most `bucket_bytes`. Each tensor is copied into the bucket
    as it arrives and then let go, and ONE buffer is reused for every bucket, so peak memory is one bucket plus the
    tensor being added. A tensor larger than a bucket becomes a bucket of its own without a copy (a byte view).

    Contract: a yielded bucket is valid until the next one is requested and may view the caller's tensors (the
    trainer's parameters): engines copy it into their own weights before asking for more and never write to it.
    Use `pack` for buckets that must outlive the iteration.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buffer: torch.Tensor | None = None
    metadata: list[TensorMeta] = []
    offset = 0
    for name, tensor in named_tensors:
        n = _nbytes(tensor)
        if metadata and (offset + n > bucket_bytes or buffer.device != tensor.device):
            yield WeightBucket(buffer[:offset], metadata)
            metadata, offset = [], 0
        if n > bucket_bytes:  # a bucket of its own, zero-copy: its bytes viewed in place
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            yield WeightBucket(data, [TensorMeta(name, tensor.shape, tensor.dtype, 0, n, n)])
            continue
        if buffer is None or buffer.device != tensor.device:
            buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=tensor.device)
        buffer[offset : offset + n].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        metadata.append(TensorMeta(name, tensor.shape, tensor.dtype, offset, offset + n, n))
        offset += n
        del tensor
    if metadata:
        yield WeightBucket(buffer[:offset], metadata)


def pack(named_tensors: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    """One bucket holding these tensors (copied into a fresh buffer on the first tensor's device)."""
    if not named_tensors:
        raise ValueError("cannot pack an empty weight bucket")
    total = sum(_nbytes(t) for _, t in named_tensors)
    flat = torch.empty(total, dtype=torch.uint8, device=named_tensors[0][1].device)
    metadata, offset = [], 0
    for name, tensor in named_tensors:
        n = _nbytes(tensor)
        flat[offset : offset + n].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        metadata.append(TensorMeta(name, tensor.shape, tensor.dtype, offset, offset + n, n))
        offset += n
    return WeightBucket(flat, metadata)
