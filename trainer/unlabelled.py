"""Unlabelled scans in training (``featcache train --unlabelled INFOS``): teacher targets where no labels exist.

Each training step takes the labelled batch it would take without unlabelled scans (the same sampler,
order and passes: a comparison with and without them trains the same labelled steps) plus ``per_labelled``
unlabelled scans per labelled sample. The student's detection loss sees the labelled samples only; every
distillation term sees both (``CacheDistiller``). The pieces:

* :class:`WithUnlabelled`: the training dataset, its length the labelled set's, so the train sampler is
  the labelled one unchanged; indices past it address the unlabelled set;
* :class:`WithUnlabelledBatchSampler`: each labelled batch plus its unlabelled scans, drawn from an endless
  stream of seeded permutations of the unlabelled set, split across ranks, a function of (seed, epoch) so a
  resumed run draws what an uninterrupted one would have;
* :func:`add_unlabelled`: wires both into a ``featcache train`` config and checks the unlabelled infos
  against the cache that holds their targets.

Teacher-only samples are marked by the pipeline (``PackDetInputsWithCache(labelled=False)``), never guessed
from an empty GT: a labelled frame may hold no box.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterator, Sequence

import torch
from mmdet3d.registry import DATA_SAMPLERS, DATASETS
from torch.utils.data import Dataset

from featcache import open_cache
from featcache.errors import CacheMismatchError, ConfigError
from featcache.teacher import models
from featcache.teacher.samples import check_covered, check_sources, dataset_keys

__all__ = ["LABELLED", "PSEUDO_LABELLED", "is_labelled", "pseudo_label", "WithUnlabelled", "WithUnlabelledBatchSampler", "add_unlabelled", "labelled_first",
           "split_inputs", "teacher_only_forward"]

log = logging.getLogger("trainer.train")
# data sample metainfo: False for a teacher-only (unlabelled) sample; absent means labelled
LABELLED = "labelled"
# what must agree between the labelled cache and the one holding the unlabelled scans' targets
SAME_TEACHER_FIELDS = ("teacher_model_sha256", "checkpoint_sha256")


# data sample metainfo: True for an unlabelled scan whose GT are the teacher's boxes (the pseudo-label baseline)
PSEUDO_LABELLED = "pseudo_labelled"


def pseudo_label(data_sample: Any, score: float, plausible: Any) -> int:
    """The hard pseudo-label baseline (``--unlabelled-pseudo-labels SCORE``): an unlabelled sample's GT becomes the
    teacher's boxes (``teacher_instances_3d``, in its augmented frame) scoring >= ``score`` that ``plausible``
    keeps, and the sample is labelled from then on (it reaches the detection loss). Returns the boxes made GT."""
    from mmengine.structures import InstanceData

    teacher = data_sample.teacher_instances_3d
    keep = (teacher.scores_3d >= score) & plausible(teacher.bboxes_3d.tensor).to(teacher.scores_3d.device)
    gt = data_sample.gt_instances_3d
    data_sample.gt_instances_3d = InstanceData(metainfo=gt.metainfo, bboxes_3d=teacher.bboxes_3d[keep],
                                               labels_3d=teacher.labels_3d[keep].long())
    data_sample.set_metainfo({LABELLED: True, PSEUDO_LABELLED: True})
    return int(keep.sum())


def is_labelled(data_sample: Any) -> bool:
    """Whether a packed data sample is a labelled one (its GT may be trained on)."""
    return bool(data_sample.metainfo.get(LABELLED, True))


@DATASETS.register_module()
class WithUnlabelled(Dataset):
    """The labelled training dataset with an unlabelled one behind it.

    ``len()`` is the labelled dataset's, so mmengine's train sampler draws the labelled samples exactly as
    it would without this wrapper; index ``len(labelled) + j`` is unlabelled sample ``j``
    (:class:`WithUnlabelledBatchSampler` adds them to each batch). ``dataset`` (the labelled one) is what
    featcache's key functions unwrap to."""

    def __init__(self, labelled: dict | Dataset, unlabelled: dict | Dataset) -> None:
        self.dataset = DATASETS.build(labelled) if isinstance(labelled, dict) else labelled
        self.unlabelled = DATASETS.build(unlabelled) if isinstance(unlabelled, dict) else unlabelled
        self.metainfo = self.dataset.metainfo
        if len(self.unlabelled) == 0:
            raise ConfigError("the unlabelled dataset (--unlabelled) holds no samples")

    @property
    def num_unlabelled(self) -> int:
        return len(self.unlabelled)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index < len(self.dataset):
            return self.dataset[index]
        return self.unlabelled[index - len(self.dataset)]

    def get_data_info(self, index: int) -> dict:
        if index < len(self.dataset):
            return self.dataset.get_data_info(index)
        return self.unlabelled.get_data_info(index - len(self.dataset))


class _EpochOf:
    """The train sampler as the batch sampler's ``sampler``: mmengine's seed hook calls ``set_epoch`` on it
    (``batch_sampler.sampler``), and the batch sampler reads the epoch back."""

    def __init__(self, sampler: Any) -> None:
        self.inner, self.epoch = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


def _sampler_attribute(sampler: Any, name: str) -> Any:
    """``name`` of the sampler or of a sampler it wraps (``CacheReadaheadSampler`` wraps mmengine's)."""
    while sampler is not None:
        if hasattr(sampler, name):
            return getattr(sampler, name)
        sampler = getattr(sampler, "sampler", None)
    return None


@DATA_SAMPLERS.register_module()
class WithUnlabelledBatchSampler:
    """Batches of ``batch_size`` labelled indices from ``sampler`` (the train sampler, unchanged), each
    followed by ``per_labelled`` unlabelled indices per labelled one (a short last batch gets fewer).

    Unlabelled scans come from an endless stream: permutation k of the unlabelled set is drawn with seed
    ``seed + k``; rank r of W takes every W-th stream entry from r, and epoch e starts where e whole epochs
    of draws end, so every scan is seen before any is seen twice and a resumed run continues the stream."""

    def __init__(self, sampler: Any, batch_size: int, per_labelled: int = 1, drop_last: bool = False,
                 seed: int | None = None) -> None:
        from mmengine.dist import get_dist_info, sync_random_seed

        dataset = _sampler_attribute(sampler, "dataset")
        if not isinstance(dataset, WithUnlabelled):
            raise ConfigError("WithUnlabelledBatchSampler needs the WithUnlabelled training dataset (featcache train "
                              "--unlabelled sets both)")
        if per_labelled < 1:
            raise ConfigError(f"--unlabelled-per-labelled must be >= 1, got {per_labelled}")
        self.sampler = _EpochOf(sampler)
        self.batch_size, self.per_labelled, self.drop_last = int(batch_size), int(per_labelled), bool(drop_last)
        self.offset, self.num_unlabelled = len(dataset), dataset.num_unlabelled
        seed = seed if seed is not None else _sampler_attribute(sampler, "seed")
        self.seed = int(seed) if seed is not None else sync_random_seed()
        self.rank, self.world_size = get_dist_info()

    def __len__(self) -> int:
        labelled = len(self.sampler)
        return labelled // self.batch_size if self.drop_last else math.ceil(labelled / self.batch_size)

    def _labelled_per_epoch(self) -> int:
        labelled = len(self.sampler)
        return (labelled // self.batch_size) * self.batch_size if self.drop_last else labelled

    def _stream(self, start: int) -> Iterator[int]:
        """This rank's unlabelled indices (0-based) from its ``start``-th draw on."""
        position = self.rank + start * self.world_size  # in the global stream
        current, order = -1, []
        while True:
            permutation, within = divmod(position, self.num_unlabelled)
            if permutation != current:
                generator = torch.Generator().manual_seed(self.seed + permutation)
                current, order = permutation, torch.randperm(self.num_unlabelled, generator=generator).tolist()
            yield order[within]
            position += self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        stream = self._stream(self.sampler.epoch * self._labelled_per_epoch() * self.per_labelled)
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch + [self.offset + next(stream) for _ in range(len(batch) * self.per_labelled)]
                batch = []
        if batch and not self.drop_last:
            yield batch + [self.offset + next(stream) for _ in range(len(batch) * self.per_labelled)]


def unlabelled_dataset_cfg(inner: dict, ann_file: str, cache: str) -> dict:
    """The labelled dataset's config (``inner``, its pipeline already packing cached targets) for the unlabelled
    scans: their info file (all of it), no empty-GT filter (they have no GT), no GT paste (the teacher never saw pasted
    objects, and pasted boxes would be the only GT of a scan nobody labelled), their targets' cache, packed as
    teacher-only samples."""
    dataset = copy.deepcopy(inner)
    dataset.update(ann_file=ann_file, filter_empty_gt=False)
    dataset.pop("indices", None)  # a subset of the labelled info file (mmengine's indices) is not one of these
    pipeline = [dict(step) for step in dataset["pipeline"] if step["type"] not in ("ObjectSample", "ObjectSampleRecorded")]
    for step in pipeline:
        if step["type"] == "PackDetInputsWithCache":
            step.update(cache=cache, labelled=False)
    dataset["pipeline"] = pipeline
    return dataset


def _layout_name(layer) -> str:
    """A cached layer's BEV layout by name ("yx", "xy"...; the record also holds how it was measured)."""
    from featcache.layout import CANONICAL, BevLayout

    return BevLayout.from_dict(layer.layout).name if layer.layout is not None else CANONICAL.name


def _check_same_targets(labelled, unlabelled, labelled_location: str, unlabelled_location: str,
                        layers: Sequence[str], teacher_boxes: bool) -> None:
    """The unlabelled scans' cache holds the same teacher's targets as the labelled one: same model and
    checkpoint, the read layers with the same shapes, codecs and layouts, and its boxes where they are read."""
    problems = ["it holds no teacher boxes (build it with --boxes)"] if teacher_boxes and unlabelled.manifest.boxes is None else []
    for field in SAME_TEACHER_FIELDS:
        if getattr(labelled.manifest, field) != getattr(unlabelled.manifest, field):
            problems.append(f"{field} differs")
    theirs = {layer.name: layer for layer in unlabelled.manifest.layers}
    for layer in labelled.manifest.layers:
        if layer.name not in layers:
            continue
        other = theirs.get(layer.name)
        if other is None:
            problems.append(f"it has no layer {layer.name}")
        elif (tuple(other.shape), other.codec.name, _layout_name(other)) != (tuple(layer.shape), layer.codec.name,
                                                                              _layout_name(layer)):
            problems.append(f"layer {layer.name} is {other.shape} {other.codec.name} layout {_layout_name(other)} "
                            f"there, {layer.shape} {layer.codec.name} layout {_layout_name(layer)} here")
    if problems:
        raise CacheMismatchError(f"unlabelled cache {unlabelled_location} does not hold the targets of the teacher that "
                                 f"built {labelled_location}: {'; '.join(problems[:4])}. Build it with the same teacher "
                                 "config, checkpoint and options (featcache build ... --out it)")


def add_unlabelled(cfg, inner: dict, labelled_dataset, spec: dict, cache_location: str, layers: Sequence[str],
                   storage_options: dict | None, terms: dict[str, dict], teacher_boxes: bool = False) -> int:
    """Make ``cfg``'s training set :class:`WithUnlabelled` (``inner``, the labelled dataset's config below any
    wrapper, already packs cached targets) and its batches :class:`WithUnlabelledBatchSampler`. ``spec``:
    dict(ann_file, cache (None: ``cache_location``), per_labelled). Every unlabelled scan must be complete in
    its cache under the same scan, and that cache hold the same teacher's targets. Returns the number of
    unlabelled scans."""
    from trainer.terms import TERMS

    ann_file = spec["ann_file"]
    location = spec.get("cache") or cache_location
    if cfg.train_dataloader.get("batch_sampler"):
        raise ConfigError(f"--unlabelled composes each batch itself, and the student config has a batch_sampler "
                          f"({cfg.train_dataloader.batch_sampler.get('type')}); remove it to train with unlabelled "
                          "scans")
    if location != cache_location:
        memory = [name for name in terms if TERMS[name].min_samples > 1]
        if memory:
            raise ConfigError(f"--kd {', '.join(memory)} keeps a memory row per cached sample of {cache_location}, and "
                              f"the unlabelled scans' targets are in another cache ({location}); use a per-batch term "
                              "(infonce, pkd, mse, heatmap, reg) or one cache built over both")
    dataset_cfg = unlabelled_dataset_cfg(inner, ann_file, location)
    dataset = models.build_dataset(dataset_cfg)
    keys = dataset_keys(dataset)
    labelled_keys = set(dataset_keys(labelled_dataset))
    both = [key for key in keys if key in labelled_keys]
    if both:
        raise ConfigError(f"--unlabelled {ann_file}: {len(both)} of its samples are labelled training samples too "
                          f"(e.g. {both[0]!r}); a scan is either labelled or not: write the unlabelled infos without them")
    cache = open_cache(location, storage_options=storage_options)
    check_covered(cache, keys, f"--unlabelled {ann_file}'s {len(keys)} scans",
                  f"build their targets with `featcache build ... --cfg-options train_dataloader.dataset.ann_file="
                  f"{ann_file}` (and give that cache with --unlabelled-cache)")
    check_sources(cache, dataset)
    if location != cache_location:
        _check_same_targets(open_cache(cache_location, storage_options=storage_options), cache, cache_location,
                            location, layers, teacher_boxes)
    cfg.train_dataloader.dataset = dict(type="WithUnlabelled", labelled=cfg.train_dataloader.dataset,
                                        unlabelled=dataset_cfg)
    cfg.train_dataloader.batch_sampler = dict(type="WithUnlabelledBatchSampler",
                                              per_labelled=int(spec.get("per_labelled", 1)))
    log.info("unlabelled scans: %d from %s (targets in %s), %d per labelled sample in each step; the detection loss "
             "sees the labelled samples only", len(keys), ann_file, location, int(spec.get("per_labelled", 1)))
    return len(keys)


def labelled_first(inputs: dict, data_samples: list) -> tuple[list, dict, int]:
    """(data samples, inputs, number of teacher-only samples), the labelled samples first (their order kept).
    A batch that is labelled throughout is returned as it is. Reordered inputs keep their per-sample parts
    (points, images) and drop the batch's voxels, which ``split_inputs`` computes again per part."""
    flags = [is_labelled(sample) for sample in data_samples]
    unlabelled = flags.count(False)
    if not unlabelled:
        return data_samples, inputs, 0
    if unlabelled == len(flags):
        raise ConfigError("a training batch holds unlabelled scans only; each batch needs labelled samples for the "
                          "detection loss (WithUnlabelledBatchSampler composes them)")
    order = [index for index, flag in enumerate(flags) if flag] + [index for index, flag in enumerate(flags) if not flag]
    if order == list(range(len(flags))):
        return data_samples, inputs, unlabelled
    reordered = {key: value for key, value in inputs.items() if key != "voxels"}
    reordered["points"] = [inputs["points"][index] for index in order]
    if "imgs" in inputs:
        reordered["imgs"] = inputs["imgs"][order]
    return [data_samples[index] for index in order], reordered, unlabelled


def split_inputs(preprocessor: Any, inputs: dict, indices: Sequence[int], data_samples: list) -> dict:
    """The inputs of the samples at ``indices`` as the student's data preprocessor would have made them for
    those samples alone: their points (and images), voxelised again (``Det3DDataPreprocessor.voxelize``: the
    voxels' batch index is their position in the part)."""
    indices = list(indices)
    part = {"points": [inputs["points"][index] for index in indices]}
    if "imgs" in inputs:
        part["imgs"] = inputs["imgs"][indices]
    if "voxels" in inputs or getattr(preprocessor, "voxel", False):
        part["voxels"] = preprocessor.voxelize(part["points"], data_samples)
    return part


def teacher_only_forward(detector: Any, inputs: dict, data_samples: list) -> Any:
    """The student's features and head outputs on teacher-only samples, without its loss (no GT exists to
    compute it against): ``extract_feat`` then the head's forward, for MVX-style detectors (CenterPoint:
    ``pts_bbox_head``) and single-stage ones (``bbox_head``)."""
    if getattr(detector, "pts_bbox_head", None) is not None:
        _, pts_feats = detector.extract_feat(inputs, [sample.metainfo for sample in data_samples])
        return detector.pts_bbox_head(pts_feats)
    if getattr(detector, "bbox_head", None) is not None:
        return detector.bbox_head(detector.extract_feat(inputs))
    raise ConfigError(f"--unlabelled: {type(detector).__name__} has neither pts_bbox_head nor bbox_head, so its forward "
                      "on unlabelled scans (features and head outputs, no loss) is not known; train it without "
                      "--unlabelled")
