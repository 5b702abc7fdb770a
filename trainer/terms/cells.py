"""Cell pieces several terms share: which cells to compare, which cells a box covers, and the student's
vectors there, gathered in one indexing operation (torch only).

* ``sample_cells``: cells drawn per sample, foreground-weighted, never from cells without a cached target.
* ``box_spans`` / ``box_cells``: the cells each axis-aligned BEV box covers; ``mean_by_box`` / ``pool_boxes``:
  means over them.
* ``gather_cells``: per sample, a map's vectors at flat cells (``LayerStep.vectors`` serves every request
  of a step with it).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sample_cells", "box_spans", "box_cells", "gather_cells", "mean_by_box", "pool_boxes"]


def sample_cells(valid: Tensor, num_samples: int, fg_weight: Tensor | None = None,
                 fg_fraction: float = 0.5) -> Tensor:
    """Draw up to ``num_samples`` distinct cells of one (H, W) map -> (S,) flat indices into H*W.

    Only cells with ``valid`` True are ever drawn. With foreground weights w >= 0 (H, W), a valid
    cell's probability is (1 - f)/n_valid + f * w/sum(w) with f = ``fg_fraction``: a fraction f of the
    draws goes to foreground in proportion to w, the rest spreads uniformly over all valid cells, so
    background negatives stay in every sample however small the foreground is. Without weights (or
    with no valid foreground) sampling is uniform. Draws are without replacement (a duplicated cell
    would be its own false negative), so the realised foreground share is about f + (1 - f) * (fg
    area share) while S is small next to the foreground cell count, and less once it is exhausted.
    S = min(num_samples, number of cells with nonzero probability).

    Only the valid cells enter the draw (a uniform one is a permutation of them); a 512x512 pillar grid
    has 262,144 cells, and a weighted draw without replacement costs one exponential variate per cell.
    """
    candidates = valid.flatten().nonzero().flatten()
    if not len(candidates):
        return candidates
    fg = None
    if fg_weight is not None:
        fg = fg_weight.flatten()[candidates].float().clamp_min(0)
        fg = fg if fg.sum() > 0 else None
    if fg is None or fg_fraction <= 0:
        return candidates[torch.randperm(len(candidates), device=candidates.device)[:num_samples]]
    prob = (1 - fg_fraction) / len(candidates) + fg_fraction * fg / fg.sum()
    count = min(num_samples, int((prob > 0).sum()))
    return candidates[torch.multinomial(prob, count, replacement=False)]


def box_spans(boxes_bev: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows [r0, r1) and columns [c0, c1) of the cells each box covers: boxes (N, 4) -> 4 x (N,) long.

    Boxes are axis-aligned [x1, y1, x2, y2] in feature-cell coordinates: x along W, y along H, cell
    (row r, col c) spanning [c, c+1) x [r, r+1) (enclose rotated boxes first). A box covers every cell
    its extent overlaps, clipped to the map, and always at least one cell, so a sub-cell or
    out-of-map box takes its nearest cell instead of none.
    """
    x1, y1, x2, y2 = boxes_bev.unbind(1)

    def span(lo: Tensor, hi: Tensor, size: int) -> tuple[Tensor, Tensor]:
        start = lo.floor().clamp(0, size - 1)
        stop = torch.maximum(hi.ceil(), start + 1).clamp(max=size)
        return start.long(), stop.long()

    (r0, r1), (c0, c1) = span(y1, y2, height), span(x1, x2, width)
    return r0, r1, c0, c1


def box_cells(boxes_bev: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The cells each box covers (``box_spans``), listed: flat indices into H*W (K,) and their box (K,)."""
    r0, r1, c0, c1 = box_spans(boxes_bev, height, width)
    cells, owners = [], []
    for index, (top, bottom, left, right) in enumerate(zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist())):
        rows = torch.arange(top, bottom, device=boxes_bev.device)
        cols = torch.arange(left, right, device=boxes_bev.device)
        flat = (rows[:, None] * width + cols[None]).flatten()
        cells.append(flat)
        owners.append(torch.full_like(flat, index))
    if not cells:
        empty = torch.zeros(0, dtype=torch.long, device=boxes_bev.device)
        return empty, empty
    return torch.cat(cells), torch.cat(owners)


def gather_cells(feature_maps: Tensor, cells: Sequence[Tensor]) -> list[Tensor]:
    """Per sample b, the vectors of ``feature_maps`` (B, D, H, W) at flat cells ``cells[b]`` (S_b,): (S_b, D).

    One indexing operation for the whole batch: every differentiable gather's backward allocates a
    zero gradient of the full input, and per-sample ``feature_maps[b]`` selects would each allocate
    one of the whole batch (at BEV sizes that costs more than the loss).
    """
    sizes = [len(index) for index in cells]
    batch = torch.repeat_interleave(torch.arange(len(cells), device=feature_maps.device),
                                    torch.as_tensor(sizes, device=feature_maps.device))
    flat_cells = torch.cat(list(cells)) if cells else batch
    return list(feature_maps.flatten(2)[batch, :, flat_cells].split(sizes))


def mean_by_box(vectors: Tensor, owners: Tensor, num_boxes: int) -> Tensor:
    """Mean of ``vectors`` (K, D) per box: row k belongs to box ``owners[k]`` -> (num_boxes, D)."""
    sums = vectors.new_zeros(num_boxes, vectors.shape[1]).index_add_(0, owners, vectors)
    counts = torch.bincount(owners, minlength=num_boxes).clamp_min(1).to(vectors.dtype)
    return sums / counts[:, None]


def pool_boxes(feature_map: Tensor, boxes_bev: Tensor) -> Tensor:
    """Mean of ``feature_map`` (D, H, W) over the cells each box covers (``box_spans``): (N, 4) -> (N, D).

    Gathers only the covered cells (``box_cells``): boxes cover a few thousand cells of a lidar BEV
    map, so this costs D x (covered cells) where a dense (N, H, W) mask product costs N x D x H x W.
    """
    cells, owners = box_cells(boxes_bev, *feature_map.shape[-2:])
    return mean_by_box(gather_cells(feature_map[None], [cells])[0], owners, len(boxes_bev))
