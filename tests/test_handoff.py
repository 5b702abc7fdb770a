"""featcache.handoff: rows handed from DataLoader workers in reused shared-memory buffers.

A buffer may be reused only after the receiving process has dropped every tensor of the row it
carried; these tests hold rows to prove that, and drop them to prove buffers are reused.
"""
from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featcache import handoff
from featcache.reader import open_cache

SPECS = [((4, 5, 6), np.uint8), ((2, 4), np.float32), ((3, 7), np.float16)]


def _fill(tensors, seed):
    for index, tensor in enumerate(tensors):
        tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape).to(tensor.dtype) + seed + index)


def _send(tensors) -> list[torch.Tensor]:
    """What a DataLoader does with a worker's sample: pickle it with ForkingPickler, unpickle it."""
    return pickle.loads(ForkingPickler.dumps(tensors))


def test_buffer_is_reused_only_after_the_receiver_drops_the_row():
    buffers = handoff.RowBuffers()
    sent = buffers.tensors(SPECS)
    _fill(sent, seed=1)
    expected = [tensor.clone() for tensor in sent]
    received = _send(sent)
    del sent
    assert [type(tensor) for tensor in received] == [torch.Tensor] * 3  # plain tensors on the receiving side
    neck_view = received[0][1:3]  # a view alone must keep the row lent
    del received

    second = buffers.tensors(SPECS)
    assert len(buffers.buffers) == 2  # the first buffer is still lent to the receiver
    _fill(second, seed=50)
    assert torch.equal(neck_view, expected[0][1:3])  # not overwritten
    del neck_view, second

    third = buffers.tensors(SPECS)
    assert len(buffers.buffers) == 2  # both returned: no new buffer
    _fill(third, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(_send(third), [t.clone() for t in third]))


def test_a_row_that_is_never_received_keeps_its_buffer_and_the_cap_falls_back():
    buffers = handoff.RowBuffers(max_buffers=2)
    lost = ForkingPickler.dumps(buffers.tensors(SPECS))  # pickled for a message that never arrives
    held = buffers.tensors(SPECS)
    fallback = buffers.tensors(SPECS)
    assert len(buffers.buffers) == 2
    assert all(tensor.is_shared() and type(tensor) is torch.Tensor for tensor in fallback)  # torch's shared memory
    assert [t.shape for t in fallback] == [torch.Size(shape) for shape, _ in SPECS]
    assert [t.dtype for t in fallback] == [torch.uint8, torch.float32, torch.float16]
    del held, lost


def test_views_of_lent_tensors_pickle_as_copies():
    buffers = handoff.RowBuffers()
    tensors = buffers.tensors(SPECS)
    _fill(tensors, seed=3)
    view = tensors[0][:, 1]  # not the lent tensor itself: torch pickles it the usual way
    assert type(view) is torch.Tensor
    assert torch.equal(_send([view])[0], view)


def test_dataloader_worker_rows_equal_the_stored_values_when_held_and_reuse_buffers_when_dropped(reference_cache):
    cache = open_cache(reference_cache)
    expected = [cache.read_row_stored(row) for row in range(len(cache))]

    class StoredRows(Dataset):
        def __len__(self):
            return len(cache)

        def __getitem__(self, row):
            features = cache.read_row_tensors(row)
            return row, features, len(handoff.row_buffers().buffers)

    def check(row, features):
        assert features.keys() == expected[row].keys()
        for name, (values, qparams) in features.items():
            assert values.dtype == torch.uint8  # stored values: decoded on the training device
            assert np.array_equal(values.numpy(), expected[row][name][0]), (row, name)
            assert np.array_equal(qparams.numpy(), expected[row][name][1]), (row, name)

    loader = DataLoader(StoredRows(), batch_size=None, num_workers=1, persistent_workers=True, shuffle=True)
    counts = []
    for _ in range(3):  # dropped as they come: a few buffers serve every row
        for row, features, count in loader:
            check(row, features)
            counts.append(count)
    assert len(counts) == 3 * len(cache) and max(counts) <= 4, counts

    held = [item for _ in range(2) for item in loader]  # held: every later row needs a buffer of its own
    assert held[-1][2] >= len(held) - 4
    for row, features, _ in held:
        check(row, features)
    in_process = cache.read_row_tensors(0)
    assert not in_process["pts_neck.0"][0].is_shared()  # outside workers: ordinary memory
