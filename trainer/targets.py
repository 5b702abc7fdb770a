"""Teacher targets of one batch as the cache handed them out, read only where a loss needs them.

The reader passes stored values (uint8 for int8 codecs, float16...) plus the per-channel affine
that decodes them; decoding and warping whole BEVFusion-size maps (31M values per sample) on
every step costs more than the distillation itself. Everything the contrastive losses need from
the teacher is linear in the map -- a few hundred bilinearly interpolated cells, box means, one
pooled vector -- so ``TeacherMaps.read`` applies a sparse read matrix (``BevAlignment.read_matrix``)
to only the teacher cells it touches, and decodes the few results afterwards (a codec that does not
decode by an affine map, ``score8``, has the touched cells decoded first instead).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from featcache import codecs


class TeacherMaps:
    """One cached layer's maps for a batch: per sample (C, H, W) stored values, plus the affine.

    ``values`` may be any dtype (as stored); ``codec`` and ``qparams`` (per sample (2, C), int8 only)
    say how they decode. Online teachers pass float maps and no codec.
    """

    def __init__(self, values: Sequence[Tensor], codec: codecs.CodecSpec | None = None,
                 qparams: Sequence[Tensor] | None = None) -> None:
        self.values = list(values)
        self.codec = codec
        self.qparams = list(qparams) if qparams is not None else None
        self.affine = [None] * len(self.values)
        if codec is not None and codec.linear:
            self.affine = [codecs.affine_tensors(codec, None if self.qparams is None else self.qparams[index])
                           for index in range(len(self.values))]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.values[0].shape[-2:])

    def decoded(self, index: int) -> Tensor:
        """Sample ``index``'s whole map, float32 (C, H, W): for dense losses (MSE)."""
        if self.codec is None:
            return self.values[index].float()
        qparams = None if self.qparams is None else self.qparams[index]
        return codecs.decode_tensor(self.values[index], self.codec, qparams)

    def read(self, index: int, matrix: Tensor) -> Tensor:
        """(M, C) float32: the sparse (M, H*W) ``matrix`` applied to sample ``index``'s decoded map.

        Only the columns (teacher cells) the matrix touches are gathered and converted to float.
        """
        matrix = matrix.coalesce()
        rows, cols = matrix.indices()
        weights = matrix.values()
        flat = self.values[index].flatten(1)
        touched, compact_cols = torch.unique(cols, return_inverse=True)
        compact = torch.sparse_coo_tensor(torch.stack([rows, compact_cols]), weights, (matrix.shape[0], len(touched)),
                                          check_invariants=True)
        if self.codec is not None and not self.codec.linear:  # decode the touched cells, then read them
            return torch.sparse.mm(compact, codecs.decode_tensor(flat[:, touched], self.codec).T)
        out = torch.sparse.mm(compact, flat[:, touched].float().T)  # (M, C)
        affine = self.affine[index]
        if affine is None:
            return out
        scale, offset = affine
        row_sums = torch.zeros(matrix.shape[0], device=weights.device).index_add_(0, rows, weights)
        return out * scale[None] + row_sums[:, None] * offset[None]

    def weighted_sum(self, index: int, cell_weights: Tensor) -> Tensor:
        """(C,) float32: sample ``index``'s decoded map summed over its cells with ``cell_weights`` (H*W,)."""
        if self.codec is not None and not self.codec.linear:
            return self.decoded(index).flatten(1) @ cell_weights
        out = self.values[index].flatten(1).float() @ cell_weights
        affine = self.affine[index]
        if affine is None:
            return out
        scale, offset = affine
        return out * scale + cell_weights.sum() * offset
