"""Distillation losses between projected student and teacher features (torch only).

* ``CRDLoss`` (+ ``ContrastMemory``, ``nce_loss``): contrastive representation distillation
  (Tian et al., ICLR 2020) on one embedding per sample, against momentum memory banks indexed by
  dataset index -- a from-scratch port of RepDistiller's ContrastMemory / ContrastLoss semantics.
* ``InfoNCELoss``: InfoNCE over BEV cells sampled per sample, foreground-weighted, never from
  cells without a valid cached target (``sample_cells``).
* ``instance_infonce`` + ``pool_boxes``: InfoNCE over GT instances pooled from the maps.
* ``MaskedMSELoss``: the masked feature-regression baseline.

None of these detach the teacher side: the teacher's projection head is trained too (as in CRD);
callers detach cached teacher features themselves if they need to.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["nce_loss", "ContrastMemory", "CRDLoss", "sample_cells", "InfoNCELoss", "instance_infonce",
           "box_spans", "box_cells", "gather_cells", "mean_by_box", "pool_boxes", "MaskedMSELoss"]

_NCE_EPS = 1e-7  # RepDistiller's epsilon, kept so losses are comparable with published numbers


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """CRD's NCE loss (RepDistiller's ContrastLoss) on normalised scores (B, 1 + m) -> scalar.

    Column 0 is the positive pair's score, columns 1..m the noise samples'; a score estimates
    P(pair)/Z. With uniform noise Pn = 1/n_data, the probability that a pair is data rather than
    noise is D = P / (P + m*Pn), and the loss is -(sum log D(pos) + sum log(1 - D(neg))) / B.
    """
    noise = (scores.shape[1] - 1) / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + _NCE_EPS))
    log_d0 = torch.log(noise / (neg + noise + _NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class ContrastMemory(nn.Module):
    """CRD's two momentum memory banks over dataset indices, and the normalised contrast scores.

    Buffers (saved with checkpoints, moved by ``.to``): ``memory_s`` / ``memory_t`` (n_data, feat_dim),
    the running student / teacher embedding of every dataset sample, initialised uniformly in
    [-stdv, stdv] with stdv = 1/sqrt(feat_dim/3); ``z_s`` / ``z_t``, the NCE normalisation constants,
    -1 until the first batch sets them to mean(scores) * n_data (so normalised scores average
    Pn = 1/n_data), fixed from then on, including across resumes.

    ``nce_k`` negatives per sample are drawn uniformly with replacement over all n_data indices (the
    distribution of RepDistiller's AliasMethod over uniform weights); as there, a sample's own index
    may come up as one of its negatives (probability 1/n_data per draw). ``nce_k`` is clamped to
    n_data - 1 so the noise mass m*Pn stays below 1 on small datasets (e.g. a few-frame demo split).

    DDP: each rank sees only its share of the batch, and ``broadcast_buffers`` then keeps only rank 0's
    banks. Pass ``gather`` (e.g. all_gather + cat over ranks) and every rank applies the same update
    with the whole global batch's indices and embeddings.
    """

    def __init__(self, feat_dim: int, n_data: int, nce_k: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, gather: Callable[[Tensor], Tensor] | None = None, seed: int = 0) -> None:
        super().__init__()
        if n_data < 2:
            raise ValueError(f"CRD needs at least 2 dataset samples to contrast, got n_data={n_data}")
        self.n_data, self.nce_k = n_data, min(nce_k, n_data - 1)
        self.temperature, self.momentum, self.gather = temperature, momentum, gather
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # Negatives come from a generator seeded by (seed, number of draws so far); the counter is a
        # buffer, so a resumed run draws exactly the negatives the uninterrupted run would have.
        self.seed = seed
        self.register_buffer("draws", torch.tensor(0, dtype=torch.long))

    def forward(self, emb_s: Tensor, emb_t: Tensor, idx: Tensor,
                contrast_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Score each embedding against the other model's bank, then update both banks at ``idx``.

        emb_s, emb_t: (B, feat_dim) L2-normalised student / teacher embeddings; idx: (B,) long dataset
        indices; contrast_idx: (B, K+1) long with contrast_idx[:, 0] == idx (drawn here when None).
        Returns (out_s, out_t), each (B, K+1), column 0 the positive:
        out_s = exp(memory_t[contrast_idx] . emb_s / T) / z_s,
        out_t = exp(memory_s[contrast_idx] . emb_t / T) / z_t,
        using the banks as they were before this batch's update.
        """
        if contrast_idx is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
            contrast_idx = torch.randint(self.n_data, (idx.shape[0], self.nce_k + 1), generator=generator)
            contrast_idx = contrast_idx.to(idx.device)
            contrast_idx[:, 0] = idx
            self.draws += 1
        out_s = self._scores(self.memory_t, contrast_idx, emb_s)
        out_t = self._scores(self.memory_s, contrast_idx, emb_t)
        for z, out in ((self.z_s, out_s), (self.z_t, out_t)):
            if z < 0:
                z.fill_(out.detach().mean() * self.n_data)
        self._update(idx, emb_s, emb_t)
        return out_s / self.z_s, out_t / self.z_t

    def _scores(self, memory: Tensor, contrast_idx: Tensor, emb: Tensor) -> Tensor:
        """exp(<memory row, emb> / T) for every contrast index: (B, K+1)."""
        return torch.exp(torch.bmm(memory[contrast_idx], emb.unsqueeze(2)).squeeze(2) / self.temperature)

    @torch.no_grad()
    def _update(self, idx: Tensor, emb_s: Tensor, emb_t: Tensor) -> None:
        """memory[idx] <- normalize(momentum * memory[idx] + (1 - momentum) * emb), for both banks."""
        if self.gather is not None:
            idx, emb_s, emb_t = self.gather(idx), self.gather(emb_s), self.gather(emb_t)
        for memory, emb in ((self.memory_s, emb_s), (self.memory_t, emb_t)):
            rows = memory[idx] * self.momentum + emb * (1 - self.momentum)
            memory.index_copy_(0, idx, F.normalize(rows, dim=1))


class CRDLoss(nn.Module):
    """CRD objective: NCE of student-vs-teacher-bank scores plus NCE of teacher-vs-student-bank scores.

    forward(student_emb (B, D), teacher_emb (B, D), idx (B,), contrast_idx (B, K+1) | None) -> scalar.
    Embeddings must already be L2-normalised (ProjectionMLP outputs on pooled features); ``idx`` are
    the samples' dataset indices in [0, n_data). Defaults follow the paper: T = 0.07, K = 4096
    negatives (clamped to n_data - 1), momentum 0.5. See ContrastMemory for buffers and DDP.
    """

    def __init__(self, feat_dim: int, n_data: int, nce_k: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, gather: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.memory = ContrastMemory(feat_dim, n_data, nce_k, temperature, momentum, gather)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, idx: Tensor,
                contrast_idx: Tensor | None = None) -> Tensor:
        out_s, out_t = self.memory(student_emb, teacher_emb, idx, contrast_idx)
        return nce_loss(out_s, self.memory.n_data) + nce_loss(out_t, self.memory.n_data)


def _info_nce(query: Tensor, key: Tensor, temperature: float, symmetric: bool) -> Tensor:
    """Mean cross-entropy of (N, N) logits query @ key.T / T, row i's positive at column i."""
    logits = query @ key.T / temperature
    target = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, target)
    return (loss + F.cross_entropy(logits.T, target)) / 2 if symmetric else loss


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


class InfoNCELoss(nn.Module):
    """InfoNCE between student and teacher BEV maps over cells sampled per sample.

    forward(student_map (B, Cs, H, W), teacher_map (B, Ct, H, W) or teacher_at(b, cells (S,)) -> (S, Ct),
    fg_weight (B, H, W) | None, valid (B, H, W) bool | None, cells: per-sample (S_b,) flat indices | None,
    project: (student_head, teacher_head) | None) -> scalar.
    A callable ``teacher_at`` returns sample b's teacher vectors at flat student-grid cells; the
    distiller reads them from the cached map there instead of warping whole maps.
    Per sample, ``num_samples`` cells are drawn by ``sample_cells`` (``valid`` excludes cells
    without a cached target, e.g. GT-paste regions or warped-out areas); the positive of a student
    cell is the teacher at the same cell, its negatives the teacher at the other sampled cells of
    that sample. Cross-entropy over the (S, S) similarity / T (both directions averaged when
    ``symmetric``), averaged over samples with at least two cells; 0 (with grad) if there are none.
    ``cells`` bypasses sampling (reproducible evaluation, tests).

    With ``project``, the maps are raw features and only the sampled cells' vectors (S, C) go
    through the projection heads (per-vector ``ProjectionMLP``): projecting whole maps first costs
    H*W/S times more (a 180x180 BEVFusion map holds 126 times the default 256 cells). Without it
    the maps must already be L2-normalised embeddings of equal channel count.
    """

    def __init__(self, num_samples: int = 256, temperature: float = 0.07, fg_fraction: float = 0.5,
                 symmetric: bool = False) -> None:
        super().__init__()
        self.num_samples, self.temperature = num_samples, temperature
        self.fg_fraction, self.symmetric = fg_fraction, symmetric

    def forward(self, student_map: Tensor, teacher_map: Tensor | Callable[[int, Tensor], Tensor],
                fg_weight: Tensor | None = None, valid: Tensor | None = None, cells: Sequence[Tensor] | None = None,
                project: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        if callable(teacher_map):
            teacher_at = teacher_map
        else:
            if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[-2:] != teacher_map.shape[-2:]:
                raise ValueError(f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} maps "
                                 "differ in batch or grid; match_resolution first")
            if project is None and student_map.shape != teacher_map.shape:
                raise ValueError(f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} maps "
                                 "differ; project both (or pass project=) and match_resolution first")

            def teacher_at(b: int, idx: Tensor) -> Tensor:
                return teacher_map[b].flatten(1)[:, idx].T

        if cells is None:
            cells = self.sample(student_map, valid, fg_weight)
        keys = [teacher_at(b, index) for b, index in enumerate(cells)]
        return self.from_vectors(gather_cells(student_map, cells), keys, project) if cells else student_map.sum() * 0

    def sample(self, student_map: Tensor, valid: Tensor | None = None, fg_weight: Tensor | None = None) -> list[Tensor]:
        """Per sample, the flat cells ``forward`` draws (``sample_cells``; all cells valid without ``valid``)."""
        cells = []
        for b in range(student_map.shape[0]):
            mask = valid[b] if valid is not None else torch.ones_like(student_map[b, 0], dtype=torch.bool)
            cells.append(sample_cells(mask, self.num_samples, None if fg_weight is None else fg_weight[b],
                                      self.fg_fraction))
        return cells

    def from_vectors(self, queries: Sequence[Tensor], keys: Sequence[Tensor],
                     project: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        """The loss on gathered cell vectors: per sample, student (S_b, Cs) and teacher (S_b, Ct) rows of the
        same cells. For callers that gather the student's cells together with others (one backward fill)."""
        losses = []
        for query, key in zip(queries, keys):
            if query.shape[0] < 2:  # no negatives
                continue
            if project is not None:
                query, key = project[0](query), project[1](key)
            losses.append(_info_nce(query, key, self.temperature, self.symmetric))
        if losses:
            return torch.stack(losses).mean()
        return sum(query.sum() for query in queries) * 0 if queries else torch.zeros(())


def instance_infonce(student_vecs: Tensor, teacher_vecs: Tensor, temperature: float = 0.07,
                     symmetric: bool = False) -> Tensor:
    """InfoNCE over N GT instances: (N, D), (N, D) -> scalar; instance i's positive is teacher row i.

    Inputs are L2-normalised here, since box means of unit vectors are shorter than unit. Returns 0
    (with grad) for N = 0; with N = 1 there is no negative and the loss is 0.
    """
    if student_vecs.shape[0] == 0:
        return student_vecs.sum() * 0
    return _info_nce(F.normalize(student_vecs, dim=1), F.normalize(teacher_vecs, dim=1), temperature, symmetric)


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


class MaskedMSELoss(nn.Module):
    """Masked feature regression: mean squared error over valid cells.

    forward(student (B, C, H, W), teacher (B, C, H, W), mask (B, H, W) bool | None) -> scalar
    sum over valid cells and channels of (student - teacher)^2 / (valid cells * C). Without a mask
    every cell is valid; with no valid cell the loss is 0 and still backpropagates (zero gradient),
    so a batch made entirely of uncached regions does not break the step.
    """

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        sq_err = (student - teacher).pow(2)
        if mask is None:
            return sq_err.mean()
        weight = mask.to(sq_err.dtype).unsqueeze(1)
        count = weight.sum() * student.shape[1]
        return (sq_err * weight).sum() / count.clamp_min(1)
