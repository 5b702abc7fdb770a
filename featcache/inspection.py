"""``featcache inspect``: what a cache holds, how small it is, how faithful, and what it looks like."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featcache import codecs, format, head_layers, store
from featcache.location import is_hdf5
from featcache.reader import FeatureCache, open_cache


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    stored_bytes_per_sample: float | None
    fp32_bytes_per_sample: int

    @property
    def ratio(self) -> float | None:
        if not self.stored_bytes_per_sample:
            return None
        return self.fp32_bytes_per_sample / self.stored_bytes_per_sample


def stored_bytes_per_sample(cache: FeatureCache, arrays: Sequence[format.ArraySpec], rows: Sequence[int]
                            ) -> float | None:
    """Stored bytes per sample: the mean over ``rows`` of the bytes their chunks of ``arrays`` occupy in the
    store, compressed (``store.chunk_nbytes``; pass ``LayerSpec.arrays()`` for a layer: its int8 scales count).
    A chunk the store holds none of (zarr writes none for a row equal to the fill value, e.g. an all-zero
    map) counts 0. None when the store says nothing: an HDF5 export (``featcache export``), or no rows.
    The one definition ``inspect``, the benchmarks and the quality runs report."""
    rows = [int(row) for row in rows]
    if not rows or is_hdf5(cache.location):
        return None
    root = cache._open()
    opened = [root[array.path] for array in arrays]  # each lookup reads the array's metadata: once per array
    total = sum(store.chunk_nbytes(array, row) or 0 for array in opened for row in rows)
    return total / len(rows) if total else None


def layer_summaries(cache: FeatureCache, sample_rows: Sequence[int]) -> list[LayerSummary]:
    """Per-layer sizes; stored bytes per sample over ``sample_rows`` (``stored_bytes_per_sample``)."""
    return [LayerSummary(layer.name, layer.shape, str(layer.codec.storage_dtype), layer.codec.name,
                         stored_bytes_per_sample(cache, layer.arrays(), sample_rows), int(np.prod(layer.shape)) * 4)
            for layer in cache.manifest.layers]


def boxes_summary(cache: FeatureCache, sample_rows: Sequence[int]) -> LayerSummary | None:
    """The teacher boxes' sizes (``--boxes``) as a layer's: one row of ``capacity x (fields + score, label)``
    float32 per sample; stored bytes per sample over ``sample_rows`` (``stored_bytes_per_sample``). None when
    the cache holds no boxes."""
    array = cache.manifest.boxes_array
    if array is None:
        return None
    return LayerSummary("teacher boxes", array.row_shape, str(array.dtype), array.codec.name,
                        stored_bytes_per_sample(cache, [array], sample_rows), int(np.prod(array.row_shape)) * 4)


def _megabytes(stored: float | None) -> str:
    if not stored:
        return "n/a"
    return f"{stored / 1e6:.2f}" if stored >= 1e4 else f"{stored / 1e6:.4f}"


def nonzero_fraction(values: np.ndarray, codec: codecs.CodecSpec, qparams: np.ndarray | None = None) -> float:
    """Fraction of one stored sample's values that are not zero; int8: that decode to more than half a
    quantisation step from zero (its affine does not put 0 on the grid unless 0 is the channel's min);
    score8, asin8: of the decoded logits, like the build's count of the teacher's output (a heatmap's
    background is a low score, stored as code 0, not a zero logit)."""
    if not values.size:
        return 0.0
    if codec.stores_scores:
        return float(np.count_nonzero(codecs.decode(values, codec, qparams))) / values.size
    if not codec.has_qparams:
        return float(np.count_nonzero(values)) / values.size
    decoded = codecs.decode(values, codec, qparams)
    step = qparams[0].reshape((-1,) + (1,) * (values.ndim - 1))
    return float(np.count_nonzero(np.abs(decoded) > step / 2)) / values.size


def spread_rows(rows: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` of ``rows``, evenly spread over them (first and last included)."""
    rows = list(rows)
    if len(rows) <= count:
        return rows
    return [rows[int(round(i * (len(rows) - 1) / (count - 1)))] for i in range(count)] if count > 1 else rows[:1]


def nearly_zero_layers(fractions: dict[str, list[float]]) -> dict[str, float]:
    """Layers whose non-zero fraction is below ``format.NEAR_ZERO_FRACTION`` in every sample looked at,
    with the largest fraction seen."""
    return {name: max(values) for name, values in fractions.items()
            if values and max(values) < format.NEAR_ZERO_FRACTION}


def zero_layer_warning(name: str, largest: float, samples: int) -> str:
    return (f"suspect: layer {name} is (nearly) all zeros in every one of the {samples} samples checked (at most "
            f"{100 * largest:.4f}% non-zero): its teacher produced nothing there (mismatched checkpoint, point cloud "
            "range, or a custom op returning what the next module does not expect); rebuild once the teacher is "
            "fixed (`featcache build ... --force`)")


def check_nonzero(cache: FeatureCache, rows: Sequence[int]) -> dict[str, list[float]]:
    """Per layer, the non-zero fraction of each of ``rows`` (stored values, checksums checked)."""
    fractions: dict[str, list[float]] = {}
    for row in rows:
        for name, (values, qparams) in cache.read_row_stored(int(row)).items():
            fractions.setdefault(name, []).append(nonzero_fraction(values, cache.manifest.layer(name).codec, qparams))
    return fractions


def layout_lines(manifest: format.Manifest) -> list[str]:
    """Each layer's BEV layout, how it was found and on what evidence (``featcache.layout``), grouped."""
    if not any(layer.layout_recorded for layer in manifest.layers):
        return ["BEV layout   not recorded (cache written before featcache recorded layouts): read as rows = y, "
                "columns = x (mmdet3d's); rebuild with --force to have it measured"]
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in manifest.layers:
        if layer.layout is None:
            continue
        scores = layer.layout.get("evidence") or {}
        best = sorted(scores.items(), key=lambda item: -item[1])[:2]
        evidence = ", ".join(f"{name} {score:.3f}" for name, score in best)
        key = (f"{layer.bev_layout.name} ({layer.bev_layout.describe()})", layer.layout.get("found", "?"))
        groups.setdefault(key, []).append(f"{layer.name}" + (f" [{evidence}]" if evidence else ""))
    return [f"BEV layout   {layout}, {found}: " + "; ".join(names) for (layout, found), names in groups.items()]


def describe(location: str, storage_options: dict[str, Any] | None = None, sample_count: int = 8) -> str:
    """Human-readable manifest, per-layer size and compression, and completion."""
    cache = open_cache(location, storage_options=storage_options)
    manifest = cache.manifest
    status = cache.status()
    complete_rows = np.flatnonzero(status == format.STATUS_COMPLETE)
    width = max([24, *(len(name) for name in manifest.layer_names)])  # head outputs have long names
    lines = [
        f"cache        {location}",
        f"format       featcache v{manifest.format_version}, created {manifest.created}",
        f"teacher      {manifest.teacher_config_path}",
        f"checkpoint   sha256 {manifest.checkpoint_sha256[:16]}...",
        f"split        {manifest.split}, {manifest.num_samples} samples, dataset id {manifest.dataset_id[:16]}...",
        f"completion   {len(complete_rows)}/{len(cache)} complete, "
        f"{int((status == format.STATUS_INVALID).sum())} invalid, {int((status == format.STATUS_MISSING).sum())} missing"
        + (f", {int((status == format.STATUS_DAMAGED).sum())} damaged (featcache verify names them, --repair "
           "rebuilds them)" if (status == format.STATUS_DAMAGED).any() else ""),
        "versions     " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()),
        "",
        f"{'layer':<{width}} {'shape':<18} {'stored':<8} {'codec':<12} {'MB/sample':>10} {'x fp32':>7} {'non-zero':>9}",
    ]
    checked = spread_rows(complete_rows, sample_count)
    fractions = check_nonzero(cache, checked)
    total_stored, total_fp32 = 0.0, 0
    for summary in layer_summaries(cache, list(complete_rows[:sample_count])):
        mb = _megabytes(summary.stored_bytes_per_sample)
        ratio = f"{summary.ratio:.1f}" if summary.ratio else "n/a"
        values = fractions.get(summary.name)
        nonzero = f"{100 * float(np.mean(values)):.2f}%" if values else "n/a"
        lines.append(f"{summary.name:<{width}} {'x'.join(map(str, summary.shape)):<18} {summary.dtype:<8} "
                     f"{summary.codec:<12} {mb:>10} {ratio:>7} {nonzero:>9}")
        total_stored += summary.stored_bytes_per_sample or 0
        total_fp32 += summary.fp32_bytes_per_sample
    boxes_size = boxes_summary(cache, list(complete_rows[:sample_count]))
    if boxes_size is not None:  # the teacher boxes' bytes, beside the layers'
        mb = _megabytes(boxes_size.stored_bytes_per_sample)
        ratio = f"{boxes_size.ratio:.1f}" if boxes_size.ratio else "n/a"
        lines.append(f"{boxes_size.name:<{width}} {'x'.join(map(str, boxes_size.shape)):<18} {boxes_size.dtype:<8} "
                     f"{boxes_size.codec:<12} {mb:>10} {ratio:>7} {'n/a':>9}")
        total_stored += boxes_size.stored_bytes_per_sample or 0
        total_fp32 += boxes_size.fp32_bytes_per_sample
    if total_stored:
        total = "all layers" if boxes_size is None else "all + boxes"
        lines.append(f"{total:<{width}} {'':<18} {'':<8} {'':<12} {total_stored / 1e6:>10.2f} "
                     f"{total_fp32 / total_stored:>7.1f}")
    if checked:
        lines.append(f"(non-zero: mean fraction of values not zero over {len(checked)} complete samples)")
    recorded = cache._open().attrs.get(format.NONZERO_ATTRIBUTE) if not is_hdf5(cache.location) else None
    if recorded:
        lines.append("non-zero at build: " + ", ".join(
            f"{name} {100 * figures['mean']:.2f}% (min {100 * figures['min']:.2f}%, {figures['samples']} samples)"
            for name, figures in recorded.items()))
    lines += layout_lines(manifest)
    cells = manifest.regression_cells
    at_centres = {layer.name for layer in manifest.layers if cells and layer.kind in head_layers.REGRESSION_OUTPUTS}
    if at_centres:
        lines.append(f"regression outputs ({len(at_centres)} layers) hold the teacher's values at box centres only "
                     f"(annotated{' and teacher' if cells.get('teacher_boxes') else ''} boxes, margin "
                     f"{cells['margin']} cells), 0 elsewhere: mostly zeros by design")
    # a mostly-zero layer is suspect only where the teacher's output is stored whole
    for name, largest in nearly_zero_layers({name: values for name, values in fractions.items()
                                             if name not in at_centres}).items():
        lines.append(zero_layer_warning(name, largest, len(checked)))
    spec = manifest.boxes
    if spec is not None:
        counts = [len(cache.read_boxes(int(row))) for row in checked]
        per_sample = (f"{np.mean(counts):.1f} per sample (max {max(counts)}) over {len(counts)} complete samples"
                      if counts else "no complete sample yet")
        stored = (f"; {boxes_size.stored_bytes_per_sample / 1e3:.1f} kB stored per sample "
                  f"({boxes_size.fp32_bytes_per_sample / 1e3:.1f} kB as float32)"
                  if boxes_size is not None and boxes_size.stored_bytes_per_sample else "")
        lines += ["", f"teacher boxes {per_sample}; up to {spec.capacity} kept per sample{stored}; fields "
                      f"{', '.join(spec.fields)}; classes {', '.join(spec.classes)}"]
    return "\n".join(lines)


def centre_cells_of_row(cache: FeatureCache, annotated_centres: np.ndarray, row: int) -> dict[str, np.ndarray]:
    """(H, W) bool per regression layer of a cache that keeps them at box centres
    (``Manifest.regression_cells``): the cells of ``row``'s annotated centres (``samples.annotated_centres``
    of the teacher's dataset) and of its cached teacher boxes, where the build stored the teacher's values.
    Empty for caches that keep every cell."""
    manifest = cache.manifest
    if manifest.regression_cells is None:
        return {}
    centres = np.asarray(annotated_centres, dtype=np.float64).reshape(-1, 2)
    if manifest.regression_cells.get("teacher_boxes") and manifest.boxes is not None:
        centres = np.concatenate([centres, cache.read_boxes(row).bboxes[:, :2].astype(np.float64)])
    bev_range = format.bev_extent(manifest.extra["point_cloud_range"])
    return {layer.name: head_layers.centre_cells(centres, bev_range, layer.shape[-2:], manifest.regression_cells["margin"],
                                           layer.bev_layout)
            for layer in manifest.layers if layer.kind in head_layers.REGRESSION_OUTPUTS}


def fidelity(cache: FeatureCache, teacher_features: dict[str, np.ndarray], row: int,
             cells: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Cosine similarity and max abs error of the cached sample ``row`` against fp32 teacher output; a
    layer in ``cells`` ((H, W) bool, ``centre_cells_of_row``) is compared at those cells only, the only
    ones its cache holds."""
    decoded = cache.read_row(row)
    report = {}
    for name, reference in teacher_features.items():
        a, b = decoded[name].astype(np.float64), reference.astype(np.float64)
        if cells and name in cells:
            a, b = a[..., cells[name]], b[..., cells[name]]
        a, b = a.ravel(), b.ravel()
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        report[name] = {"cosine": float(a @ b / denominator) if denominator else 1.0,
                        "max_abs_error": float(np.abs(a - b).max(initial=0.0)),
                        "max_abs_value": float(np.abs(b).max(initial=0.0))}
    return report


def bev_energy(features: np.ndarray) -> np.ndarray:
    """Per-cell L2 norm over channels of a (C, H, W) map: where the BEV map carries signal."""
    flat = features.reshape(features.shape[0], *features.shape[-2:]) if features.ndim > 3 else features
    return np.sqrt((flat.astype(np.float32) ** 2).sum(axis=0))


def _box_outline(box: np.ndarray, extent: Sequence[float], height: int, width: int) -> np.ndarray:
    """(5, 2) closed BEV outline of a box (x, y, l, w, yaw...) in pixel coordinates of a (height, width)
    map covering ``extent`` [x0, y0, x1, y1] (imshow's pixel centres sit on integer coordinates)."""
    x, y, length, box_width, yaw = (float(box[i]) for i in (0, 1, 3, 4, 6))
    corners = np.array([[0.5, 0.5], [0.5, -0.5], [-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]) * [length, box_width]
    rotation = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    world = corners @ rotation.T + [x, y]
    x0, y0, x1, y1 = extent
    return np.stack([(world[:, 0] - x0) / (x1 - x0) * width - 0.5, (world[:, 1] - y0) / (y1 - y0) * height - 0.5], 1)


def plot_sample(cache: FeatureCache, key: str, out_png: str) -> str:
    """PNG of one sample: the BEV feature energy of each feature layer and the score map (sigmoid, max over
    classes) of each cached heatmap, with the cached teacher boxes drawn on every panel when the cache
    holds them (regression head outputs are not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = cache.read(key)
    panels = []
    for name, value in features.items():
        layer = cache.manifest.layer(name)
        if not layer.is_head_output:
            panels.append((name, bev_energy(value), "magma", value.shape))
        elif layer.meaning.get("stored") == "logits":
            scores = 1.0 / (1.0 + np.exp(-value.astype(np.float32)))
            panels.append((f"{name} ({', '.join(layer.meaning['classes'])})", scores.max(axis=0), "viridis",
                           value.shape))
    spec = cache.manifest.boxes
    boxes = cache.teacher_boxes(key) if spec is not None else None
    extent = format.bev_extent(cache.manifest.extra.get("point_cloud_range"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for axis, (title, image_values, cmap, shape) in zip(axes[0], panels):
        image = axis.imshow(image_values, origin="lower", cmap=cmap)
        if boxes is not None and extent is not None:
            for box in boxes.bboxes:
                outline = _box_outline(box, extent, *image_values.shape)
                axis.plot(outline[:, 0], outline[:, 1], color="cyan", linewidth=0.7)
            axis.set_xlim(-0.5, image_values.shape[1] - 0.5), axis.set_ylim(-0.5, image_values.shape[0] - 0.5)
        axis.set_title(f"{title}\n{'x'.join(map(str, shape))}", fontsize=9)
        axis.set_xticks([]), axis.set_yticks([])
        fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    drawn = f", {len(boxes)} teacher boxes (cyan)" if boxes is not None else ""
    fig.suptitle(f"BEV feature energy (L2 over channels), heatmap scores{drawn}, sample {key}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
