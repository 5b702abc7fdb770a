"""CenterHead post-processing in numpy: box decoding and NMS as mmdet3d 1.4's ``CenterHead.predict_by_feat``.

Per task: sigmoid heatmap, ``CenterPointBBoxCoder.decode`` (top ``max_num`` centres over classes, the
offset, height, log-size, sin/cos yaw and velocity maps gathered there, ``score_threshold`` and
``post_center_range``), then the ``test_cfg``'s NMS: ``circle`` (mmdet3d's ``circle_nms``: squared
centre distance <= ``min_radius``) or ``rotate`` (``nms_bev``: score threshold, top ``pre_max_size``,
greedy suppression at rotated BEV IoU >= ``nms_thr`` (mmcv's ``nms_rotated``), ``post_max_size``,
``post_center_limit_range``). Tasks are concatenated, labels offset by the classes of earlier tasks,
and z moved from the box centre to its bottom, so the result is the tensor of mmdet3d's
``LiDARInstance3DBoxes`` (x, y, z_bottom, dx, dy, dz, yaw[, vx, vy]).

Arithmetic follows the PyTorch code in float32, so the decoded boxes equal mmdet3d's up to the ONNX
graph's own rounding (1e-5); rotated IoU is computed in float64 (mmcv: float32), which changes a
suppression only for an IoU within ~1e-6 of the threshold. Only numpy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.deploy.spec import DecoderSpec, NmsSpec, TaskSpec


@dataclass(frozen=True)
class Detections:
    """mmdet3d's ``pred_instances_3d`` as arrays: ``boxes`` (N, 7 or 9) float32 in the
    ``LiDARInstance3DBoxes.tensor`` layout, ``scores`` (N,) float32, ``labels`` (N,) int64 (index into
    the export's ``class_names``)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-values.astype(np.float32)))).astype(np.float32)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries along the last axis, largest first (ties: lower index first)."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def decode_task(maps: dict[str, np.ndarray], decoder: DecoderSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``CenterPointBBoxCoder.decode`` of one task's maps (batch 1): boxes (K, code_size) with the
    gravity-centre z, scores (K,), labels within the task (K,) int64, after its threshold and range."""
    heat = _sigmoid(maps["heatmap"][0])  # (classes, H, W)
    classes, height, width = heat.shape
    k = decoder.max_num
    flat = heat.reshape(classes, -1)
    if flat.shape[1] < k:
        raise ValueError(f"decoder.max_num {k} exceeds the {flat.shape[1]} cells of the heatmap")
    if decoder.score_threshold:
        # the top k, then the threshold, equals the cells above the threshold, then their top k: sort only
        # those (the threshold is monotone, and the stable sort keeps the tie order of the full one)
        threshold = np.float32(decoder.score_threshold)
        per_class = [np.flatnonzero(row > threshold) for row in flat]
        per_class = [cells[np.argsort(-row[cells], kind="stable")[:k]] for row, cells in zip(flat, per_class)]
        per_class_scores = np.concatenate([row[cells] for row, cells in zip(flat, per_class)])
        labels = np.concatenate([np.full(len(cells), label, dtype=np.int64) for label, cells in enumerate(per_class)])
        best = _top(per_class_scores, k)
        scores, cells, labels = per_class_scores[best], np.concatenate(per_class)[best], labels[best]
    else:
        per_class = _top(flat, k)  # (classes, K)
        per_class_scores = np.take_along_axis(flat, per_class, axis=1)
        best = _top(per_class_scores.reshape(-1), k)
        scores = per_class_scores.reshape(-1)[best]
        cells = per_class.reshape(-1)[best]
        labels = best // k
    ys = (cells // width).astype(np.float32)
    xs = (cells % width).astype(np.float32)

    def gather(name: str) -> np.ndarray:
        feature = maps[name][0]
        return feature.reshape(feature.shape[0], -1)[:, cells].T.astype(np.float32)  # (K, channels)

    if "reg" in maps:
        reg = gather("reg")
        xs, ys = xs + reg[:, 0], ys + reg[:, 1]
    else:
        xs, ys = xs + 0.5, ys + 0.5
    rot = gather("rot")
    yaw = np.arctan2(rot[:, 0], rot[:, 1])
    hei = gather("height")[:, 0]
    dim = gather("dim")
    if decoder.norm_bbox:
        dim = np.exp(dim)
    xs = xs * decoder.out_size_factor * np.float32(decoder.voxel_size[0]) + np.float32(decoder.pc_range[0])
    ys = ys * decoder.out_size_factor * np.float32(decoder.voxel_size[1]) + np.float32(decoder.pc_range[1])
    columns = [xs, ys, hei, dim[:, 0], dim[:, 1], dim[:, 2], yaw]
    if "vel" in maps:
        vel = gather("vel")
        columns += [vel[:, 0], vel[:, 1]]
    boxes = np.stack(columns, axis=1).astype(np.float32)
    keep = np.ones(len(boxes), dtype=bool)
    if decoder.post_center_range:
        rng = np.asarray(decoder.post_center_range, dtype=np.float32)
        keep &= ((boxes[:, :3] >= rng[:3]) & (boxes[:, :3] <= rng[3:])).all(axis=1)
    if decoder.score_threshold:
        keep &= scores > np.float32(decoder.score_threshold)
    return boxes[keep], scores[keep], labels[keep].astype(np.int64)


def circle_nms(centers: np.ndarray, scores: np.ndarray, radius: float, post_max_size: int | None) -> np.ndarray:
    """mmdet3d's ``circle_nms``: keep a box unless a kept higher-scoring one lies within squared
    distance ``radius`` (mmdet3d compares the squared distance with the radius as given)."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank, i in enumerate(order):
        if suppressed[rank]:
            continue
        keep.append(int(i))
        rest = order[rank + 1:]
        dist = (centers[i, 0] - centers[rest, 0]) ** 2 + (centers[i, 1] - centers[rest, 1]) ** 2
        suppressed[rank + 1:] |= dist <= radius
    if post_max_size is not None:
        keep = keep[:post_max_size]
    return np.asarray(keep, dtype=np.int64)


def _corners(boxes: np.ndarray) -> np.ndarray:
    """(M, 4, 2) corners of (x, y, w, h, angle) boxes in mmcv's ``get_rotated_vertices`` order."""
    x, y, w, h, a = (boxes[:, i] for i in range(5))
    cos, sin = np.cos(a) * 0.5, np.sin(a) * 0.5
    p0 = np.stack([x - sin * h - cos * w, y + cos * h - sin * w], axis=1)
    p1 = np.stack([x + sin * h - cos * w, y - cos * h - sin * w], axis=1)
    centre = np.stack([x, y], axis=1)
    return np.stack([p0, p1, 2 * centre - p0, 2 * centre - p1], axis=1)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]


def _inside(points: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """(M, 4) whether each of 4 points lies in its rectangle (mmcv's dot-product test, boundary inside)."""
    ab = quads[:, 1] - quads[:, 0]
    da = quads[:, 0] - quads[:, 3]
    ap = points - quads[:, None, 0]
    ap_ab = (ap * ab[:, None]).sum(-1)
    ap_ad = -(ap * da[:, None]).sum(-1)
    return (ap_ab >= 0) & (ap_ad >= 0) & (ap_ab <= (ab * ab).sum(-1)[:, None]) & (ap_ad <= (da * da).sum(-1)[:, None])


def rotated_iou_pairs(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """BEV IoU of each (x, y, w, h, angle) box in ``boxes`` (M, 5) with the same row of ``others``, as
    mmcv's ``single_box_iou_rotated``: the intersection is the convex hull of edge crossings and
    contained corners (centres shifted to the pair's midpoint first); area < 1e-14 gives IoU 0."""
    others = np.asarray(others, dtype=np.float64)
    box = np.array(np.broadcast_to(np.asarray(boxes, dtype=np.float64), others.shape))
    shift = (box[:, :2] + others[:, :2]) / 2.0
    box[:, :2] -= shift
    others = others.copy()
    others[:, :2] -= shift
    a, b = _corners(box), _corners(others)  # (M, 4, 2)
    va, vb = np.roll(a, -1, axis=1) - a, np.roll(b, -1, axis=1) - b
    # every edge i of a against every edge j of b
    det = _cross(vb[:, None, :, :], va[:, :, None, :])  # (M, 4, 4)
    d = b[:, None, :, :] - a[:, :, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = _cross(vb[:, None, :, :], d) / det
        t2 = _cross(va[:, :, None, :], d) / det
    crossing = (np.abs(det) > 1e-14) & (t1 >= 0) & (t1 <= 1) & (t2 >= 0) & (t2 <= 1)
    points = a[:, :, None, :] + va[:, :, None, :] * np.where(crossing, t1, 0.0)[..., None]
    candidates = np.concatenate([points.reshape(len(a), 16, 2), a, b], axis=1)  # (M, 24, 2)
    valid = np.concatenate([crossing.reshape(len(a), 16), _inside(a, b), _inside(b, a)], axis=1)
    candidates = np.where(valid[..., None], candidates, 0.0)
    count = valid.sum(axis=1)
    centroid = candidates.sum(axis=1) / np.maximum(count, 1)[:, None]
    rel = candidates - centroid[:, None]
    angle = np.where(valid, np.arctan2(rel[..., 1], rel[..., 0]), np.inf)
    order = np.argsort(angle, axis=1, kind="stable")
    ring = np.take_along_axis(rel, order[..., None], axis=1)
    ring_valid = np.take_along_axis(valid, order, axis=1)
    ring = np.where(ring_valid[..., None], ring, ring[:, :1])  # padding repeats the first vertex: no area
    inter = np.abs(_cross(ring, np.roll(ring, -1, axis=1)).sum(axis=1)) / 2.0
    inter = np.where(count > 2, inter, 0.0)
    area_a, area_b = box[:, 2] * box[:, 3], others[:, 2] * others[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_a + area_b - inter)
    return np.where((area_a < 1e-14) | (area_b < 1e-14), 0.0, iou)


def rotated_nms(boxes_xywhr: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """mmcv's ``nms_rotated`` (CPU): greedy by descending score, a box is dropped at IoU >= threshold
    with a kept one. Returns kept indices in score order."""
    return rotated_nms_many([(boxes_xywhr, scores)], threshold)[0]


def rotated_nms_many(groups: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> list[np.ndarray]:
    """:func:`rotated_nms` of several independent (boxes, scores) groups (the head's tasks), with one
    vectorised IoU call for all of them: numpy's per-call overhead, not arithmetic, dominates at this size.

    IoU is computed only for the pairs whose circumscribed circles meet: the others have IoU 0, which
    suppresses nothing for a threshold > 0 (and everything for one <= 0)."""
    if not groups:
        return []
    orders = [np.argsort(-scores, kind="stable") for _, scores in groups]
    if threshold <= 0.0:
        return [order[:1].astype(np.int64) for order in orders]
    sorted_boxes, firsts, seconds = [], [], []
    offset = 0
    for (boxes, _), order in zip(groups, orders):
        boxes = np.asarray(boxes, dtype=np.float64)[order]
        radius = np.hypot(boxes[:, 2], boxes[:, 3]) / 2.0
        distance = np.hypot(boxes[:, None, 0] - boxes[None, :, 0], boxes[:, None, 1] - boxes[None, :, 1])
        first, second = np.nonzero(np.triu(distance <= radius[:, None] + radius[None, :], k=1))
        sorted_boxes.append(boxes)
        firsts.append(first + offset)
        seconds.append(second + offset)
        offset += len(boxes)
    everything = np.concatenate(sorted_boxes)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    if first.size:
        overlapping = rotated_iou_pairs(everything[first], everything[second]) >= threshold
        first, second = first[overlapping], second[overlapping]
    kept_groups = []
    offset = 0
    for boxes, order in zip(sorted_boxes, orders):
        count = len(boxes)
        mine = (first >= offset) & (first < offset + count)
        later: dict[int, list[int]] = {}
        for i, j in zip((first[mine] - offset).tolist(), (second[mine] - offset).tolist()):
            later.setdefault(i, []).append(j)
        suppressed = np.zeros(count, dtype=bool)
        keep = []
        for rank in range(count):
            if suppressed[rank]:
                continue
            keep.append(int(order[rank]))
            if rank in later:
                suppressed[later[rank]] = True
        kept_groups.append(np.asarray(keep, dtype=np.int64))
        offset += count
    return kept_groups


def _rotate_candidates(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, nms: NmsSpec,
                       single_class: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``CenterHead.get_task_detections`` up to the NMS call: the thresholded boxes and, for the NMS, the
    ``order`` of its top ``pre_max_size`` and their (x, y, w, h, angle) in float32 as ``nms_bev`` computes them."""
    if single_class:
        labels = np.zeros_like(labels)
    if nms.score_threshold > 0.0:
        keep = scores >= np.float32(nms.score_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # LiDARInstance3DBoxes.bev (x, y, dx, dy, yaw) -> xyxyr -> back to xywhr, in float32 as nms_bev does
    bev = boxes[:, [0, 1, 3, 4, 6]].astype(np.float32)
    half_w, half_h = bev[:, 2] / np.float32(2), bev[:, 3] / np.float32(2)
    x1, y1, x2, y2 = bev[:, 0] - half_w, bev[:, 1] - half_h, bev[:, 0] + half_w, bev[:, 1] + half_h
    order = np.argsort(-scores, kind="stable")
    if nms.pre_max_size is not None:
        order = order[:nms.pre_max_size]
    xywhr = np.stack([(x1 + x2) / np.float32(2), (y1 + y2) / np.float32(2), x2 - x1, y2 - y1, bev[:, 4]],
                     axis=1)[order]
    return boxes, scores, labels, order, xywhr


def _rotate_finish(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, selected: np.ndarray,
                   nms: NmsSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rest of ``get_task_detections`` after the NMS kept ``selected``."""
    if nms.post_max_size is not None:
        selected = selected[:nms.post_max_size]
    boxes, scores, labels = boxes[selected], scores[selected], labels[selected]
    if nms.post_center_limit_range and len(boxes):
        rng = np.asarray(nms.post_center_limit_range, dtype=np.float32)
        keep = ((boxes[:, :3] >= rng[:3]) & (boxes[:, :3] <= rng[3:])).all(axis=1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return boxes, scores, labels


def postprocess(outputs: dict[str, np.ndarray], tasks: tuple[TaskSpec, ...], decoder: DecoderSpec,
                nms: NmsSpec) -> Detections:
    """The head's dense outputs (``task<i>.<name>`` -> (1, C, H, W)) to mmdet3d's predictions."""
    decoded = []
    for index, task in enumerate(tasks):
        maps = {name: outputs[f"task{index}.{name}"] for name in task.outputs}
        decoded.append(decode_task(maps, decoder))
    results = []
    if nms.type == "circle":
        for index, (boxes, scores, labels) in enumerate(decoded):
            keep = circle_nms(boxes[:, :2], scores, nms.min_radius[index], nms.post_max_size)
            results.append((boxes[keep], scores[keep], labels[keep]))
    else:
        candidates = [_rotate_candidates(boxes, scores, labels, nms, len(task.class_names) == 1)
                      for (boxes, scores, labels), task in zip(decoded, tasks)]
        kept = rotated_nms_many([(xywhr, scores[order]) for _, scores, _, order, xywhr in candidates], nms.nms_thr)
        for (boxes, scores, labels, order, _), selected in zip(candidates, kept):
            results.append(_rotate_finish(boxes, scores, labels, order[selected], nms))
    all_boxes, all_scores, all_labels = [], [], []
    offset = 0
    for (boxes, scores, labels), task in zip(results, tasks):
        all_boxes.append(boxes)
        all_scores.append(scores)
        all_labels.append(labels + offset)
        offset += len(task.class_names)
    boxes = np.concatenate(all_boxes).astype(np.float32)
    boxes[:, 2] = boxes[:, 2] - boxes[:, 5] * np.float32(0.5)  # gravity centre -> bottom centre
    return Detections(boxes, np.concatenate(all_scores).astype(np.float32), np.concatenate(all_labels))
