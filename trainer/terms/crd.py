"""``crd``: CRD (Tian et al., ICLR 2020) on each sample's valid-cell mean, against momentum memory banks
over cache rows.

* ``CRDLoss`` (+ ``ContrastMemory``, ``nce_loss``): contrastive representation distillation on one
  embedding per sample, against momentum memory banks indexed by dataset index -- a from-scratch port of
  RepDistiller's ContrastMemory / ContrastLoss semantics. The teacher side is not detached: its
  projection head is trained too (as in CRD).
* ``CRDTerm``: the term on the distiller's step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.terms.base import KDTerm, LayerStep, TermContext, projection_heads, register_term

__all__ = ["nce_loss", "ContrastMemory", "CRDLoss", "CRDTerm"]


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


@register_term
class CRDTerm(KDTerm):
    """CRD on one embedding per sample: the student map and the warped teacher map, each averaged over
    the sample's valid cells, projected and contrasted against memory banks over cache rows."""

    name = "crd"
    min_samples = 2  # contrasts samples against each other

    def __init__(self, context: TermContext, feat_dim: int = 128, temperature: float = 0.07,
                 nce_k: int = 4096, momentum: float = 0.5) -> None:
        super().__init__(context)
        self.heads = projection_heads(context, feat_dim)
        self.criteria = nn.ModuleDict({key: CRDLoss(feat_dim, context.num_samples, nce_k=nce_k,
                                                    temperature=temperature, momentum=momentum,
                                                    gather=context.gather) for key in context.channels})

    def layer_loss(self, layer: LayerStep) -> Tensor:
        weights = layer.valid.flatten(1).float()
        denominator = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        pooled_s = (layer.student.flatten(2) * weights[:, None]).sum(dim=2) / denominator
        pooled_t = torch.stack([layer.teacher.weighted_sum(index, alignment.splat(weights[index] / denominator[index]))
                                for index, alignment in enumerate(layer.alignments)])
        heads = self.heads[layer.key]
        return self.criteria[layer.key](heads["student"](pooled_s), heads["teacher"](pooled_t.to(layer.student.dtype)),
                                        layer.rows)
