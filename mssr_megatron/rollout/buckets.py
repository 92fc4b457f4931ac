"""Weight buckets: many named tensors packed into one flat byte buffer, the layout SGLang's
`FlattenedTensorBucket` (load_format="flattened_bucket") reconstructs.

Layout: tensors are laid end to end as raw bytes (row-major) in a uint8 tensor; for each one the metadata holds
(name, shape, dtype, start byte, end byte, byte count). Each tensor starts at a multiple of its element size (at most
itemsize - 1 zero bytes of padding before it): SGLang rebuilds a tensor as `flat[start:end].view(dtype)`, which torch
refuses at a misaligned byte offset (e.g. a float32 after three bfloat16 values). A bucket that needs no padding
(e.g. one dtype) has exactly the unpadded layout of SGLang's `FlattenedTensorBucket.empty`, the receive buffer of
update_weights_from_distributed. `stream_buckets` writes tensors straight into one reused buffer, so streaming a whole
model costs one bucket plus the one tensor being added, never a second copy; for an engine that still reads a bucket
after its update call returned (SGLang over CUDA IPC), it gives every bucket a buffer of its own instead.
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


def _aligned(offset: int, tensor: torch.Tensor) -> int:
    """The first byte offset >= `offset` at which `tensor` can be viewed from a uint8 buffer (see module docstring)."""
    size = tensor.element_size()
    return -(-offset // size) * size


def stream_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                   fresh_buffers: bool = False) -> Iterator[WeightBucket]:
    """Pack a stream of (name, tensor) into buckets of at most `bucket_bytes`. Each tensor is copied into the bucket
    as it arrives and then let go, and ONE buffer is reused for every bucket, so peak memory is one bucket plus the
    tensor being added. A tensor larger than a bucket becomes a bucket of its own without a copy (a byte view).

    Contract: a yielded bucket is valid until the next one is requested and may view the caller's tensors (the
    trainer's parameters): engines copy it into their own weights before asking for more and never write to it.
    Use `pack` for buckets that must outlive the iteration.

    fresh_buffers=True: every bucket gets a buffer of its own and this generator never writes to a bucket it has
    yielded, so a consumer that still reads a bucket after asking for the next one (SGLang copies from a CUDA-IPC view
    on its own stream, without synchronising, after its update call has returned) sees the bytes that were sent. The
    buffer of a bucket nobody holds any more goes back to torch's allocator; under CUDA IPC, torch keeps a shared
    block out of reuse until the receiving process has synchronised its stream and dropped its reference. Peak memory
    is then one bucket more (the previous one, while the consumer's loop still holds it).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buffer: torch.Tensor | None = None
    metadata: list[TensorMeta] = []
    offset = 0
    for name, tensor in named_tensors:
        n = _nbytes(tensor)
        start = _aligned(offset, tensor)
        if metadata and (start + n > bucket_bytes or buffer.device != tensor.device):
            yield WeightBucket(buffer[:offset], metadata)
            metadata, offset, start = [], 0, 0
            if fresh_buffers:
                buffer = None  # the yielded bucket keeps its buffer; the next one is allocated below
        if n > bucket_bytes:  # a bucket of its own, zero-copy: its bytes viewed in place
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            yield WeightBucket(data, [TensorMeta(name, tensor.shape, tensor.dtype, 0, n, n)])
            continue
        if buffer is None or buffer.device != tensor.device:
            buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=tensor.device)
        buffer[offset:start].zero_()  # alignment padding: deterministic bytes
        buffer[start : start + n].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        metadata.append(TensorMeta(name, tensor.shape, tensor.dtype, start, start + n, n))
        offset = start + n
        del tensor
    if metadata:
        yield WeightBucket(buffer[:offset], metadata)


def pack(named_tensors: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    """One bucket holding these tensors (copied into a fresh buffer on the first tensor's device)."""
    if not named_tensors:
        raise ValueError("cannot pack an empty weight bucket")
    metadata, offset = [], 0
    for name, tensor in named_tensors:
        start = _aligned(offset, tensor)
        metadata.append(TensorMeta(name, tensor.shape, tensor.dtype, start, start + _nbytes(tensor), _nbytes(tensor)))
        offset = start + _nbytes(tensor)
    flat = torch.zeros(offset, dtype=torch.uint8, device=named_tensors[0][1].device)
    for meta, (_, tensor) in zip(metadata, named_tensors):
        flat[meta.start_idx : meta.end_idx].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return WeightBucket(flat, metadata)
