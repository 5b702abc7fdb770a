"""A teacher detector together with the test-pipeline dataset it is run on.

Shared by ``featcache build`` (cache targets), ``featcache inspect --fidelity`` (fp32 reference)
and the trainer's ``--online-teacher`` mode, so all three compute features the same way.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from featcache import boxes
from featcache.teacher import heads, models, recording
from featcache.teacher.options import split_layer_names
from featcache.teacher.samples import dataset_keys, item_sources
from featcache.errors import ConfigError, InputDataError


class _KeyedSamples(Dataset):
    """The teacher's dataset, yielding ``(row, key, item)`` and naming the sample on failure."""

    def __init__(self, dataset, keys: Sequence[str]) -> None:
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        key = self.keys[row]
        try:
            item = self.dataset[row]
        except Exception as exc:
            raise InputDataError(f"sample {key!r} (row {row}, {_lidar_path(self.dataset, row)}) cannot be loaded: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if item is None:
            raise InputDataError(f"sample {key!r} (row {row}, {_lidar_path(self.dataset, row)}): the pipeline "
                                 "returned nothing (empty or filtered point cloud?)")
        points = item.get("inputs", {}).get("points")
        if isinstance(points, torch.Tensor):
            if points.shape[0] == 0:
                raise InputDataError(f"sample {key!r} (row {row}, {_lidar_path(self.dataset, row)}) has no points "
                                     "left after the pipeline")
            if not torch.isfinite(points).all():
                raise InputDataError(f"sample {key!r} (row {row}, {_lidar_path(self.dataset, row)}) has NaN/Inf "
                                     "point coordinates or features")
        return row, key, item


def _lidar_path(dataset, row: int) -> str:
    try:
        info = dataset.get_data_info(row)
        return str(info.get("lidar_points", {}).get("lidar_path") or info.get("lidar_path") or "no lidar path")
    except Exception:
        return "info unavailable"


def _collate(batch):
    from mmengine.dataset import pseudo_collate

    rows, keys, items = zip(*batch)
    return list(rows), list(keys), pseudo_collate(list(items))


class Teacher:
    """``features(batch)`` runs the detector up to its last hooked module on a collated batch."""

    def __init__(self, config: str, checkpoint: str, layers: str | Sequence[str] | None = None, split: str = "train",
                 cfg_options: dict[str, Any] | None = None, device: str = "cpu",
                 trust_globals: Sequence[str] = (), head_outputs: str | Sequence[str] | None = None) -> None:
        self.modules = split_layer_names(layers) if layers is not None else None
        head_kinds = heads.parse_head_outputs(head_outputs)
        self.cfg = models.load_config(config, cfg_options)
        heads.check_config_head_outputs(self.cfg, head_kinds)  # a refusal before the dataset and model are built
        self.dataset_cfg = models.dataset_cfg_for_split(self.cfg, split)
        self.dataset = models.build_dataset(self.dataset_cfg)
        if len(self.dataset) == 0:
            raise ConfigError(f"split {split!r} of {config} has no samples")
        self.keys = dataset_keys(self.dataset)
        self.sources = item_sources(self.dataset)  # each key's lidar file, relative to the data root
        self.model = models.build_model(self.cfg, checkpoint, device, trust_globals).eval()
        if self.modules is None:  # the detector's own convention (pts_* or middle_encoder, backbone, neck)
            self.modules = models.default_layers(self.model)
        # the head's dense outputs, after the features: {layer: HeadOutput}; each is one module's output
        self.head_outputs = {output.layer: output
                             for output in heads.head_outputs(self.model, head_kinds, self._dataset_classes())}
        self.modules = list(dict.fromkeys([*self.modules, *self.head_outputs]))
        recording.find_modules(self.model, self.modules)  # fail now, naming the module, not mid-build
        self.samples = _KeyedSamples(self.dataset, self.keys)

    @classmethod
    def from_manifest(cls, manifest, checkpoint: str | None = None, cfg_options: dict[str, Any] | None = None,
                      device: str = "cpu") -> "Teacher":
        """The teacher that built a cache, from the paths and options its manifest recorded."""
        checkpoint = checkpoint or manifest.extra.get("checkpoint_path")
        if not checkpoint or not os.path.isfile(checkpoint):
            raise ConfigError(f"teacher checkpoint {checkpoint!r} not found; pass --checkpoint")
        options = {**manifest.extra.get("cfg_options", {}), **(cfg_options or {})}
        return cls(manifest.teacher_config_path, checkpoint, manifest.extra["modules"], split=manifest.split,
                   cfg_options=options, device=device)

    def loader(self, rows: Sequence[int], batch_size: int = 1, num_workers: int = 0) -> DataLoader:
        """Batches of ``(rows, keys, collated_batch)`` for the given dataset rows, in order."""
        return DataLoader(Subset(self.samples, list(rows)), batch_size=batch_size, shuffle=False,
                          num_workers=num_workers, collate_fn=_collate,
                          prefetch_factor=2 if num_workers else None)

    def features(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Batched float32 features ``{layer: (B, C, H, W)}`` of a collated batch."""
        outputs = recording.record_teacher(self.model, batch, self.modules)
        return {name: tensor.float().cpu().numpy() for name, tensor in outputs.items()}

    def features_and_boxes(self, batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[boxes.TeacherBoxes]]:
        """``features`` plus each sample's decoded predictions (the detector's own decoder and NMS)."""
        features, predicted, _ = self.features_and_checked_boxes(batch)
        return features, predicted

    def features_and_checked_boxes(self, batch: dict[str, Any]
                                   ) -> tuple[dict[str, np.ndarray], list[boxes.TeacherBoxes], list[str | None]]:
        """``features_and_boxes`` plus, per sample, the NaN/Inf values of the head's own outputs the boxes were
        decoded from (None: all finite; ``recording.NonFiniteWatch``): finite boxes of a NaN head are wrong."""
        head_name, head = heads.find_head(self.model)
        with recording.NonFiniteWatch(head, head_name) as watch:
            outputs, predictions = recording.record_teacher_and_predict(self.model, batch, self.modules)
        return ({name: tensor.float().cpu().numpy() for name, tensor in outputs.items()},
                [boxes.predictions(sample) for sample in predictions], watch.problems(len(predictions)))

    def _dataset_classes(self) -> tuple[str, ...] | None:
        """The dataset's classes (metainfo), else the config's ``class_names``; None when neither names any."""
        classes = (getattr(self.dataset, "metainfo", None) or {}).get("classes") or self.cfg.get("class_names")
        return tuple(classes) if classes else None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class of each prediction label: the dataset's classes (labels index them in mmdet3d)."""
        classes = self._dataset_classes()
        if not classes:
            raise ConfigError("the teacher's dataset names no classes (metainfo.classes) and its config no "
                              "class_names: the labels of its boxes could not be named")
        return tuple(classes)

    def lidar_paths(self, keys: Sequence[str]) -> list[str]:
        """The lidar files of samples, by key (for error messages)."""
        rows = {key: row for row, key in enumerate(self.keys)}
        return [_lidar_path(self.dataset, rows[key]) for key in keys]

    def row_of(self, key: str) -> int:
        """This teacher's dataset row of sample ``key`` (ConfigError if its dataset lacks it)."""
        if not hasattr(self, "_rows"):
            self._rows = {k: row for row, k in enumerate(self.keys)}
        if key not in self._rows:
            raise ConfigError(f"sample {key!r} is not in the teacher's {len(self.keys)}-sample dataset")
        return self._rows[key]

    def features_of_row(self, row: int) -> dict[str, np.ndarray]:
        _, _, batch = next(iter(self.loader([row])))
        return {name: value[0] for name, value in self.features(batch).items()}
