"""Hand a cache row from a DataLoader worker to the training process in reused shared memory.

torch sends a worker's tensors to the main process through shared memory, and the kernel
zero-fills fresh shared-memory pages on first touch: for a BEVFusion-lidar row (31 MB of stored
int8 maps) that took about as long as decompressing the row (BENCHMARKS.md, read path). A worker that
decompresses into a buffer it has used before pays none of that. So each worker process keeps a
few buffers (``memfd`` files), puts one row's arrays in one buffer, and reuses the buffer once the
receiving process has dropped every tensor of that row.

Protocol, with one writer per counter so no lock is needed: a buffer's first bytes hold two
counters. The worker increments ``lent`` each time it pickles the row for another process (pickle
memoises the row's lease, so that is once per message however many arrays the row has); the
receiving process increments ``returned`` once per received row, when the last tensor viewing it is
garbage-collected. A buffer is reused only when ``lent == returned`` and no tensor in the worker
still views it. A row that never arrives (a DataLoader shut down mid-epoch) leaves its buffer lent;
past ``MAX_BUFFERS`` buffers a worker hands out ordinary shared memory, so nothing ever waits.
"""
from __future__ import annotations

import mmap
import os
import weakref
from multiprocessing.reduction import DupFd, ForkingPickler
from typing import Sequence

import numpy as np
import torch

# Counters (lent, returned) as uint64; 64 bytes keeps the arrays after them cache-line aligned.
_HEADER_BYTES = 64
_ALIGN = 64
MAX_BUFFERS = 32
"""Buffers one process keeps at most. The DataLoader bounds how many rows are in flight per worker
(``prefetch_factor`` batches plus those the training step still holds), so this is only reached
when a consumer keeps rows alive; past it, rows go out in fresh shared memory as torch does."""


class _LentTensor(torch.Tensor):
    """A tensor viewing a lent buffer; pickles as (buffer, offset) instead of a copy of its data.

    Only the exact tensors ``RowBuffers.tensors`` returns have this type: torch operations on them
    return plain tensors, which torch pickles the usual way.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _featcache_lease: "_Lease"


class _Buffer:
    """One shared-memory file kept by a worker process for its rows."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create("featcache-row", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _HEADER_BYTES + nbytes)
        self.map = mmap.mmap(self.fd, _HEADER_BYTES + nbytes)
        self.counters = np.frombuffer(self.map, np.uint64, 2)  # lent, returned
        self.data_address = self.counters.ctypes.data + _HEADER_BYTES
        self.in_use: weakref.ref | None = None  # this process's view of the current row

    def reusable(self) -> bool:
        held_here = self.in_use is not None and self.in_use() is not None
        return not held_here and self.counters[0] == self.counters[1]


class _Lease:
    """One row's use of a buffer; what a message carries once, however many arrays the row has."""

    def __init__(self, buffer: _Buffer) -> None:
        self.buffer = buffer


def _reduce_lease(lease: _Lease):
    buffer = lease.buffer
    buffer.counters[0] += 1
    return _receive_row, (DupFd(buffer.fd), _HEADER_BYTES + buffer.nbytes)


def _receive_row(dup_fd, size: int) -> np.ndarray:
    """Receiving side: map the buffer; when every array viewing the mapping is gone, count the row
    returned and unmap."""
    fd = dup_fd.detach()
    try:
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    row = np.frombuffer(mapping, np.uint8, size - _HEADER_BYTES, _HEADER_BYTES)
    weakref.finalize(row, _return_row, mapping)
    return row


def _return_row(mapping: mmap.mmap) -> None:
    # the dying array still holds its buffer export here; the mapping unmaps when it is collected
    np.frombuffer(mapping, np.uint64, 2)[1] += 1


def _reduce_lent_tensor(tensor: _LentTensor):
    lease = tensor._featcache_lease
    offset = tensor.data_ptr() - lease.buffer.data_address
    return _receive_tensor, (lease, offset, tuple(tensor.shape), tensor.numpy().dtype.str)


def _receive_tensor(row: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    dtype_ = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(row[offset:offset + count * dtype_.itemsize].view(dtype_).reshape(shape))


ForkingPickler.register(_Lease, _reduce_lease)
ForkingPickler.register(_LentTensor, _reduce_lent_tensor)


class RowBuffers:
    """A process's reusable shared-memory buffers, one row per buffer.

    ``tensors(specs)`` returns empty tensors of the given shapes and numpy dtypes, all in one buffer,
    for a reader to fill and a DataLoader worker to send. Use ``shared_tensors`` (this process's
    instance, or torch's shared memory where memfd is missing) rather than an instance of your own.
    """

    def __init__(self, max_buffers: int = MAX_BUFFERS) -> None:
        self.max_buffers = max_buffers
        self.buffers: list[_Buffer] = []

    def tensors(self, specs: Sequence[tuple[Sequence[int], np.dtype]]) -> list[torch.Tensor]:
        specs = [(tuple(shape), np.dtype(dtype)) for shape, dtype in specs]
        offsets, nbytes = [], 0
        for shape, dtype in specs:
            offsets.append(nbytes)
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            nbytes += -(-size // _ALIGN) * _ALIGN
        buffer = next((b for b in self.buffers if b.nbytes == nbytes and b.reusable()), None)
        if buffer is None:
            if len(self.buffers) >= self.max_buffers:
                return _fresh_shared_tensors(specs)
            buffer = _Buffer(nbytes)
            self.buffers.append(buffer)
        row = np.frombuffer(buffer.map, np.uint8, nbytes, _HEADER_BYTES)
        buffer.in_use = weakref.ref(row)
        lease = _Lease(buffer)
        out = []
        for (shape, dtype), offset in zip(specs, offsets):
            count = int(np.prod(shape, dtype=np.int64))
            view = row[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)
            tensor = torch.from_numpy(view).as_subclass(_LentTensor)
            tensor._featcache_lease = lease
            out.append(tensor)
        return out


_process_buffers: tuple[int, RowBuffers] | None = None


def row_buffers() -> RowBuffers | None:
    """This process's ``RowBuffers`` (a forked child gets its own), or None where memfd is missing
    (non-Linux)."""
    global _process_buffers
    if not hasattr(os, "memfd_create"):
        return None
    if _process_buffers is None or _process_buffers[0] != os.getpid():
        _process_buffers = (os.getpid(), RowBuffers())
    return _process_buffers[1]


def shared_tensors(specs: Sequence[tuple[Sequence[int], np.dtype]]) -> list[torch.Tensor]:
    """Empty tensors (shapes, numpy dtypes) for one row that a DataLoader worker will send: in this
    process's reused buffers, or in torch's fresh shared memory where memfd is missing."""
    buffers = row_buffers()
    if buffers is None:
        return _fresh_shared_tensors(specs)
    return buffers.tensors(specs)


def _fresh_shared_tensors(specs: Sequence[tuple[Sequence[int], np.dtype]]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.empty(tuple(shape), dtype)).share_memory_() for shape, dtype in specs]
