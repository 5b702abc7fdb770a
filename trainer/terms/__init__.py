"""Distillation loss terms: small torch-only modules, each owning its projection heads or adapters, one
module per term (as mmrazor keeps one loss per file); what they share is in :mod:`trainer.terms.base` (the
per-step view, the base class, the registry, ``--kd`` parsing) and :mod:`trainer.terms.cells` (cell
sampling, box cells, gathering).

Terms are combined by weight (``--kd infonce=1,pkd=5``); each returns one loss per distilled layer pair,
logged as ``loss_kd_<term>_<layer>``. Nothing here imports mmengine or mmdet3d, so every term is
unit-tested on plain tensors (tests/test_losses_heads.py, tests/test_terms.py).

Terms (:data:`TERMS`, registered in this order):

* ``crd`` (:mod:`.crd`): CRD on each sample's valid-cell mean, momentum memory banks over cache rows.
* ``infonce`` (:mod:`.infonce`): InfoNCE over sampled BEV cells, plus InfoNCE over GT instances.
* ``mse`` (:mod:`.mse`): masked feature regression through a 1x1 adapter.
* ``pkd`` (:mod:`.pkd`): PKD, 1 - Pearson's r per channel over the compared valid cells.
* ``heatmap`` (:mod:`.heatmap`): response distillation on CenterHead class heatmaps: score MSE / L1 (SparseKD,
  UniDistill) or a soft-target focal / BCE loss on logits that still teaches where the student misses.
* ``reg`` (:mod:`.reg`): response distillation on CenterHead regression outputs at GT centres and the
  teacher's confident peaks.
* ``label`` (:mod:`.label`): label distillation: confident teacher boxes join the student's GT.

Feature terms read the ``feature`` pairs (hooked layers); response terms (``heatmap``, ``reg``) read
the pairs of their kind (cached head outputs); :attr:`KDTerm.kinds` says which (``label`` reads none).

The two regression terms compare ``cells_per_sample`` valid cells per sample (default 512), drawn
uniformly (0: every valid cell): an unbiased estimate of the loss over all valid cells that reads only
those cells' teacher values (``TeacherMaps.read``), never decoding and warping whole maps. At
BEVFusion-lidar sizes (512 channels on 180x180 per layer) the dense path cost 2-5x the student's own step.
"""
from trainer.terms.base import (TERMS, DistillStep, KDTerm, LayerStep, TermContext, build_term, parse_kd_spec,
                                register_term)
# each term module registers its term on import; this order is TERMS' order
from trainer.terms.crd import CRDTerm
from trainer.terms.infonce import InfoNCETerm
from trainer.terms.mse import MSETerm
from trainer.terms.pkd import PKDTerm
from trainer.terms.heatmap import HeatmapTerm
from trainer.terms.reg import RegressionTerm
from trainer.terms.label import LabelTerm

__all__ = ["LayerStep", "DistillStep", "TermContext", "KDTerm", "TERMS", "register_term", "build_term",
           "parse_kd_spec", "CRDTerm", "InfoNCETerm", "MSETerm", "PKDTerm",
           "HeatmapTerm", "RegressionTerm", "LabelTerm"]
