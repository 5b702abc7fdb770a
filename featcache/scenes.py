"""Seeded synthetic lidar scenes written as a dataset mmdet3d's own ``NuScenesDataset`` loads.

Each scan is ray-cast from a spinning HDL-32E-like sensor at the origin of the LIDAR frame
(nuScenes' LIDAR_TOP sits 1.84 m above the road) into a street scene: an undulating ground
height field, labelled oriented boxes (nuScenes classes, sizes and label ids) and unlabelled
clutter (building facades, poles, foliage made of ellipsoid clusters). Every ray keeps its
first hit only, so density falls with range, objects shadow each other and faces turned away
from the sensor get no returns.

Output layout (what ``NuScenesDataset`` with ``data_prefix=dict(pts='samples/LIDAR_TOP')`` reads)::

    OUT/samples/LIDAR_TOP/<name>.pcd.bin    float32 x, y, z, intensity (0-255), ring (beam index)
    OUT/nuscenes_infos_{train,val}.pkl      mmdet3d v2 infos: {'metainfo', 'data_list'}

Annotation conventions, taken from mmdet3d's NuScenesDataset and the real v2 info pkl:
``bbox_3d`` is [x, y, z, l, w, h, yaw] in the LIDAR frame with z at the box's *gravity centre*
(NuScenesDataset builds its boxes with ``origin=(0.5, 0.5, 0.5)``), l along the heading and yaw
counter-clockwise from +x. ``num_lidar_pts`` is the number of returns from the object, which
equals the points inside its box (see ``INSET``). Boxes that no ray reaches are dropped from
the annotations: NuScenesDataset would filter them anyway (``num_lidar_pts > 0``), and dropping
them keeps the pkl identical to what a model trains on.

``generate_dataset`` writes a whole dataset (``tools/generate_scenes.py`` is its command line); the demo, the
quality benchmark and the tests use it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NUS_CLASSES = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle",
               "pedestrian", "traffic_cone", "barrier")
METAINFO = {"categories": {name: label for label, name in enumerate(NUS_CLASSES)},
            "dataset": "nuscenes", "version": "v1.0-synthetic", "info_version": "1.1"}
SENSOR_HEIGHT = 1.84  # nuScenes LIDAR_TOP above the ground (lidar2ego z)
LIDAR2EGO = [[1.0, 0.0, 0.0, 0.94], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, SENSOR_HEIGHT], [0.0, 0.0, 0.0, 1.0]]
ELEVATION_DEG = (-30.67, 10.67)  # HDL-32E beam span (ring 0 = lowest beam, as in nuScenes)
AZIMUTH_STEPS = 1084  # firings per ring and sweep in nuScenes scans (0.332 deg)
# The solid that is rendered is its label box shrunk by INSET on every face, and hard-surface range
# noise is clipped below INSET: a return can then never leave its own box, so num_lidar_pts (returns
# from the object) equals the points-in-box count any evaluator computes.
INSET = 0.03
# Label boxes rest this far above the highest ground under them, so ground returns (noise included)
# never fall inside a box and count as its points.
GROUND_CLEARANCE = 0.02
SPLIT_IDS = {"train": 0, "val": 1}
STAMP_NAME = "featcache_synth_stamp.json"
GENERATOR = "featcache-synth/1"

# intensity mean, intensity log-sd, range-noise sd, range-noise clip, dropout probability
MATERIALS = {
    "ground": (9.0, 0.5, 0.01, 0.025, 0.05), "car": (30.0, 0.6, 0.01, 0.025, 0.03),
    "truck": (35.0, 0.6, 0.01, 0.025, 0.03), "bicycle": (22.0, 0.5, 0.01, 0.025, 0.08),
    "pedestrian": (18.0, 0.4, 0.01, 0.025, 0.03), "traffic_cone": (120.0, 0.5, 0.01, 0.025, 0.03),
    "barrier": (60.0, 0.4, 0.01, 0.025, 0.03), "wall": (40.0, 0.4, 0.01, 0.025, 0.03),
    "pole": (70.0, 0.4, 0.01, 0.025, 0.03), "foliage": (15.0, 0.6, 0.05, 0.15, 0.3),
}
MATERIAL_IDS = {name: index for index, name in enumerate(MATERIALS)}
MATERIAL_TABLE = np.array(list(MATERIALS.values()))
# nuScenes mean size (l, w, h), instances per scene, lateral band, heading mode; placed in this
# order, large objects first while the road is still free
CLASSES = {
    "truck": ((6.93, 2.51, 2.84), (0, 2), "road", "street"),
    "car": ((4.63, 1.97, 1.74), (5, 12), "road", "street"),
    "bicycle": ((1.70, 0.60, 1.28), (1, 4), "edge", "street"),
    "pedestrian": ((0.73, 0.67, 1.77), (3, 10), "walk", "any"),
    "barrier": ((2.49, 0.48, 0.99), (0, 5), "edge", "street"),
    "traffic_cone": ((0.41, 0.41, 1.07), (0, 5), "edge", "any"),
}


@dataclass
class Ground:
    """Height field z = z0 + slope . (x, y) + sum of sinusoids, in the LIDAR frame."""

    z0: float = -SENSOR_HEIGHT
    slope: tuple[float, float] = (0.0, 0.0)
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # rows: amplitude, kx, ky, phase

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        z = self.z0 + self.slope[0] * x + self.slope[1] * y
        for amplitude, kx, ky, phase in self.waves:
            z = z + amplitude * np.sin(kx * x + ky * y + phase)
        return z

    def intersect(self, d: np.ndarray) -> np.ndarray:
        """Range along unit rays ``d`` (N, 3) from the origin to the ground, inf where none."""
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        descent = dz - self.slope[0] * dx - self.slope[1] * dy
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(descent < 0, self.z0 / descent, np.inf)
            # Newton on t*dz - height(t*d), started from the tilted plane; the undulation is gentle.
            for _ in range(5):
                x, y = t * dx, t * dy
                slope = self.slope[0] * dx + self.slope[1] * dy
                for amplitude, kx, ky, phase in self.waves:
                    slope = slope + amplitude * np.cos(kx * x + ky * y + phase) * (kx * dx + ky * dy)
                t = t - (t * dz - self.height(x, y)) / (dz - slope)
            residual = np.abs(t * dz - self.height(t * dx, t * dy))
        return np.where((descent < 0) & (t > 0) & (residual < 1e-6), t, np.inf)


@dataclass
class Scene:
    """Everything a sweep sees. Boxes use the info layout [x, y, z_gravity_centre, l, w, h, yaw]."""

    boxes: np.ndarray  # (K, 7) labelled objects
    labels: np.ndarray  # (K,) nuScenes label ids
    ground: Ground = field(default_factory=Ground)
    walls: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))  # unlabelled boxes
    poles: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # x, y, radius, z_bottom, z_top
    blobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))  # ellipsoids: x, y, z, rx, ry, rz


def _unit(angle: np.ndarray | float) -> np.ndarray:
    """Unit 2D vectors at ``angle`` (radians), stacked on the last axis."""
    return np.stack([np.cos(angle), np.sin(angle)], -1)


def _corners(footprints: np.ndarray, pad: float) -> np.ndarray:
    """(M, 4, 2) corners of footprints (M, 5) = x, y, l, w, yaw, each side grown by ``pad``."""
    c, s = np.cos(footprints[:, 4]), np.sin(footprints[:, 4])
    along = np.stack([c, s], -1) * (footprints[:, 2:3] / 2 + pad)
    across = np.stack([-s, c], -1) * (footprints[:, 3:4] / 2 + pad)
    signs = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]])[None, :, :, None]
    return footprints[:, None, :2] + signs[:, :, 0] * along[:, None] + signs[:, :, 1] * across[:, None]


def _is_free(candidate: np.ndarray, placed: np.ndarray, gap: float) -> bool:
    """Separating-axis test: ``candidate`` keeps at least ``gap`` from every placed footprint."""
    a, b = _corners(candidate[None], gap / 2)[0], _corners(placed, gap / 2)
    axes_a = np.broadcast_to(np.stack([np.cos(candidate[4]), np.sin(candidate[4])]), (len(placed), 2))
    axes_b = np.stack([np.cos(placed[:, 4]), np.sin(placed[:, 4])], -1)
    axes = np.stack([axes_a, axes_a[:, ::-1] * [-1, 1], axes_b, axes_b[:, ::-1] * [-1, 1]], 1)
    pa, pb = np.einsum("cd,mad->mac", a, axes), np.einsum("mcd,mad->mac", b, axes)
    separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return bool(separated.any(-1).all())


def _ground_under(ground: Ground, footprint: np.ndarray, pad: float = 0.2) -> np.ndarray:
    """Ground heights on a 3x3 grid over the footprint grown by ``pad``."""
    grid = np.linspace(-1, 1, 3)
    along, across = np.meshgrid(grid * (footprint[2] / 2 + pad), grid * (footprint[3] / 2 + pad))
    c, s = np.cos(footprint[4]), np.sin(footprint[4])
    return ground.height(footprint[0] + c * along - s * across, footprint[1] + s * along + c * across)


def sample_scene(rng: np.random.Generator, max_range: float = 50.0) -> Scene:
    """Lay out a street roughly along the ego's +x: facades, labelled objects, poles, foliage."""
    wavenumbers = (2 * np.pi / rng.uniform(40, 100, 2))[:, None] * _unit(rng.uniform(-np.pi, np.pi, 2))
    waves = np.column_stack([rng.uniform(0.02, 0.06, 2), wavenumbers, rng.uniform(0, 2 * np.pi, 2)])
    ground = Ground(slope=tuple(rng.uniform(-0.01, 0.01, 2)), waves=waves)
    heading, road, walk = rng.normal(0.0, 0.05), rng.uniform(4.0, 7.0), rng.uniform(3.0, 6.0)
    ego_u = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, road - 1.5)
    bands = {"road": (0.0, road - 0.5), "edge": (road - 1.5, road - 0.2), "walk": (road + 0.3, road + walk - 0.3)}
    s_axis, u_axis = _unit(heading), _unit(heading + np.pi / 2)
    placed = [np.array([0.4, 0.0, 4.4, 2.0, 0.0])]  # the ego car around the sensor

    def place(length: float, width: float, yaw: float, band: str) -> np.ndarray | None:
        for _ in range(30):
            u = rng.choice([-1.0, 1.0]) * rng.uniform(*bands[band])
            x, y = rng.uniform(-max_range, max_range) * s_axis + (u - ego_u) * u_axis
            footprint = np.array([x, y, length, width, yaw])
            # the 0.3 m gap exceeds the foliage noise clip: clutter returns never land in a label box
            if 2.0 < np.hypot(x, y) < max_range - 1.0 and _is_free(footprint, np.array(placed), 0.3):
                placed.append(footprint)
                return footprint
        return None

    walls = []
    for side in (-1.0, 1.0):
        s = -max_range - 10.0
        while s < max_range + 10.0:
            length, depth, height = rng.uniform(6, 25), rng.uniform(0.4, 1.0), rng.uniform(4, 15)
            if rng.random() < 0.8:
                u = side * (road + walk + depth / 2 + rng.uniform(0, 3))
                footprint = np.array([*((s + length / 2) * s_axis + (u - ego_u) * u_axis), length, depth, heading])
                bottom = _ground_under(ground, footprint).min() - 0.3
                walls.append([*footprint[:2], bottom + height / 2, length, depth, height, heading])
                placed.append(footprint)
            s += length + rng.uniform(1, 8)

    boxes, labels = [], []
    for name, (size, (low, high), band, mode) in CLASSES.items():
        for _ in range(rng.integers(low, high + 1)):
            length, width, height = np.array(size) * rng.normal(1.0, 0.06, 3)
            yaw = heading + rng.choice([0.0, np.pi]) + rng.normal(0, 0.05) if mode == "street" \
                else rng.uniform(-np.pi, np.pi)
            footprint = place(length, width, float(np.arctan2(np.sin(yaw), np.cos(yaw))), band)
            if footprint is not None:
                bottom = _ground_under(ground, footprint).max() + GROUND_CLEARANCE
                boxes.append([*footprint[:2], bottom + height / 2, length, width, height, footprint[4]])
                labels.append(NUS_CLASSES.index(name))

    poles, blobs = [], []
    for _ in range(rng.integers(4, 11)):
        radius, height = rng.uniform(0.08, 0.2), rng.uniform(4, 9)
        footprint = place(2 * radius, 2 * radius, 0.0, "walk")
        if footprint is not None:
            base = ground.height(*footprint[:2])
            poles.append([*footprint[:2], radius, base - 0.2, base + height])
    for _ in range(rng.integers(3, 11)):
        tree = rng.random() < 0.5
        size = rng.uniform(1.2, 2.5) if tree else rng.uniform(0.5, 1.3)
        footprint = place(2 * size, 2 * size, 0.0, "walk")
        if footprint is None:
            continue
        base = ground.height(*footprint[:2])
        if tree:
            trunk, crown_base = rng.uniform(0.12, 0.3), rng.uniform(2.0, 3.5)
            poles.append([*footprint[:2], trunk, base - 0.2, base + crown_base + size])
            centre = np.array([*footprint[:2], base + crown_base + 0.8 * size])
        else:
            centre = np.array([*footprint[:2], base + 0.4 * size])
        count = rng.integers(3, 7)
        # offsets <= 0.4 and radii <= 0.6 of size keep the cluster inside its placed footprint
        centres = centre + rng.uniform(-1, 1, (count, 3)) * size * np.array([0.4, 0.4, 0.3])
        blobs.extend(np.column_stack([centres, rng.uniform(0.35, 0.6, (count, 3)) * size]))
    return Scene(np.array(boxes).reshape(-1, 7), np.array(labels, dtype=np.int64), ground,
                 np.array(walls).reshape(-1, 7), np.array(poles).reshape(-1, 5), np.array(blobs).reshape(-1, 6))


def _hit_boxes(elevation: np.ndarray, azimuth: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(B, A, K) range to the first face of each oriented box, inf on a miss.

    Rays start at the origin, so the xy slab depends on azimuth only and the z slab on elevation
    only; both are solved in horizontal distance and combined, never forming (rays, K, 3) arrays.
    """
    x, y, z, length, width, height, yaw = boxes.T
    c, s = np.cos(yaw), np.sin(yaw)
    u = _unit(azimuth)
    with np.errstate(divide="ignore", invalid="ignore"):
        entries, exits = [], []
        for direction, origin, half in ((u @ np.stack([c, s]), -(c * x + s * y), length / 2),
                                        (u @ np.stack([-s, c]), s * x - c * y, width / 2)):
            t1, t2 = (-half - origin) / direction, (half - origin) / direction
            entries.append(np.minimum(t1, t2))
            exits.append(np.maximum(t1, t2))
        tan = np.tan(elevation)[:, None]
        z1, z2 = (z - height / 2) / tan, (z + height / 2) / tan
        near = np.maximum(np.maximum(*entries)[None], np.minimum(z1, z2)[:, None])
        far = np.minimum(np.minimum(*exits)[None], np.maximum(z1, z2)[:, None])
    return np.where((near <= far) & (near > 0), near, np.inf) / np.cos(elevation)[:, None, None]


def _hit_poles(elevation: np.ndarray, azimuth: np.ndarray, poles: np.ndarray) -> np.ndarray:
    """(B, A, K) range to vertical cylinders; caps are never seen (bottom buried, top above the sensor)."""
    along = _unit(azimuth) @ poles[:, :2].T
    disc = along**2 - (poles[:, :2] ** 2).sum(1) + poles[:, 2] ** 2
    with np.errstate(invalid="ignore"):
        h = np.where(disc >= 0, along - np.sqrt(disc), -1.0)[None]
    z = h * np.tan(elevation)[:, None, None]
    hit = (h > 0) & (z >= poles[:, 3]) & (z <= poles[:, 4])
    return np.where(hit, h, np.inf) / np.cos(elevation)[:, None, None]


def _hit_blobs(d: np.ndarray, blobs: np.ndarray) -> np.ndarray:
    """(N, K) range to axis-aligned ellipsoids: a unit-sphere quadratic after scaling by the radii."""
    inv2 = 1.0 / blobs[:, 3:] ** 2
    a, b = d**2 @ inv2.T, -(d @ (blobs[:, :3] * inv2).T)
    c = (blobs[:, :3] ** 2 * inv2).sum(1) - 1.0
    disc = b**2 - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def render(scene: Scene, rng: np.random.Generator, beams: int = 32,
           max_range: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """One sweep: (points (P, 5) float32, owner (P,) index into ``scene.boxes`` or -1)."""
    elevation = np.radians(np.linspace(*ELEVATION_DEG, beams))
    azimuth = (np.arange(AZIMUTH_STEPS) + rng.random()) * (2 * np.pi / AZIMUTH_STEPS)
    d = np.stack(np.broadcast_arrays(np.outer(np.cos(elevation), np.cos(azimuth)),
                                     np.outer(np.cos(elevation), np.sin(azimuth)),
                                     np.sin(elevation)[:, None]), -1).reshape(-1, 3)
    solids = scene.boxes.copy()
    solids[:, 3:6] -= 2 * INSET
    classes = [MATERIAL_IDS[NUS_CLASSES[label]] for label in scene.labels]
    walls, poles, blobs = len(scene.walls), len(scene.poles), len(scene.blobs)
    layers = [  # (ranges, material per primitive, owning label box per primitive)
        (scene.ground.intersect(d)[:, None], [MATERIAL_IDS["ground"]], [-1]),
        (_hit_boxes(elevation, azimuth, np.concatenate([solids, scene.walls])),
         classes + [MATERIAL_IDS["wall"]] * walls, list(range(len(solids))) + [-1] * walls),
        (_hit_poles(elevation, azimuth, scene.poles), [MATERIAL_IDS["pole"]] * poles, [-1] * poles),
        (_hit_blobs(d, scene.blobs), [MATERIAL_IDS["foliage"]] * blobs, [-1] * blobs),
    ]
    t = np.full(len(d), np.inf)
    material, owner = np.zeros(len(d), dtype=np.int64), np.full(len(d), -1, dtype=np.int64)
    for ranges, materials, owners in layers:
        if not materials:
            continue
        ranges = ranges.reshape(len(d), -1)
        first = ranges.argmin(1)
        closer = ranges[np.arange(len(d)), first] < t
        t[closer] = ranges[closer, first[closer]]
        material[closer], owner[closer] = np.asarray(materials)[first[closer]], np.asarray(owners)[first[closer]]
    mean, log_sd, noise_sd, noise_clip, dropout = MATERIAL_TABLE[material].T
    keep = (t <= max_range) & (rng.random(len(d)) >= dropout)
    distance = t + np.clip(rng.normal(size=len(d)) * noise_sd, -noise_clip, noise_clip)
    intensity = np.clip(np.rint(mean * np.exp(log_sd * rng.normal(size=len(d)))), 0, 255)
    ring = np.repeat(np.arange(beams), AZIMUTH_STEPS)
    points = np.column_stack([d * distance[:, None], intensity, ring])[keep]
    return points.astype(np.float32), owner[keep]


def _build(rng: np.random.Generator, beams: int, max_range: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scene + sweep; boxes without a single return are dropped. Also returns num_lidar_pts."""
    scene = sample_scene(rng, max_range)
    points, owner = render(scene, rng, beams, max_range)
    counts = np.bincount(owner[owner >= 0], minlength=len(scene.labels))
    seen = counts > 0
    return points, scene.boxes[seen], scene.labels[seen], counts[seen]


def generate_scene(rng: np.random.Generator, beams: int = 32,
                   max_range: float = 50.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points (P, 5) float32, boxes (K, 7) [x, y, z_gravity_centre, l, w, h, yaw], labels (K,))."""
    return _build(rng, beams, max_range)[:3]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: independent streams per (seed, split, index), so splits never share."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _info(seed: int, split: str, index: int, lidar_name: str, boxes: np.ndarray,
          labels: np.ndarray, counts: np.ndarray) -> dict:
    token = hashlib.md5(f"{GENERATOR}:{seed}:{split}:{index}".encode()).hexdigest()
    return {
        "sample_idx": index, "token": token,
        "timestamp": 1.6e9 + 1e6 * SPLIT_IDS[split] + 0.5 * index,
        "ego2global": np.eye(4).tolist(), "images": {},
        "lidar_points": {"num_pts_feats": 5, "lidar_path": lidar_name, "lidar2ego": LIDAR2EGO},
        "instances": [{"bbox_3d": [float(v) for v in box], "bbox_label": int(label), "bbox_label_3d": int(label),
                       "bbox_3d_isvalid": True, "num_lidar_pts": int(count), "num_radar_pts": 0,
                       "velocity": [0.0, 0.0]} for box, label, count in zip(boxes, labels, counts)],
    }


def generate_dataset(out_dir: str | Path, num_train: int, num_val: int, seed: int,
                     beams: int = 32, max_range: float = 50.0) -> dict:
    """Write the dataset under ``out_dir`` unless a stamp with these exact parameters is already there.

    The stamp is written last, so an interrupted run is redone rather than trusted.
    Returns the stamp plus ``generated`` (False when skipped), ``ann_files`` and, when generated,
    per-split ``mean_points`` and ``class_counts``.
    """
    out = Path(out_dir)
    stamp = {"generator": GENERATOR, "seed": seed, "train": num_train, "val": num_val,
             "beams": beams, "range": max_range}
    stamp_path = out / STAMP_NAME
    ann_files = {split: str(out / f"nuscenes_infos_{split}.pkl") for split in SPLIT_IDS}
    summary = {**stamp, "ann_files": ann_files}
    if (stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
            and all(Path(path).is_file() for path in ann_files.values())):
        print(f"{out}: dataset with seed {seed} and these parameters already exists; nothing to do")
        return {**summary, "generated": False}
    stamp_path.unlink(missing_ok=True)
    lidar_dir = out / "samples" / "LIDAR_TOP"
    lidar_dir.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        data_list, points_per_scan, class_counts = [], [], dict.fromkeys(CLASSES, 0)
        for index in range(count):
            points, boxes, labels, counts = _build(scene_rng(seed, split, index), beams, max_range)
            name = f"synth_{split}_{index:06d}__LIDAR_TOP.pcd.bin"
            points.tofile(lidar_dir / name)
            data_list.append(_info(seed, split, index, name, boxes, labels, counts))
            points_per_scan.append(len(points))
            for label in labels:
                class_counts[NUS_CLASSES[label]] += 1
        with open(ann_files[split], "wb") as handle:
            pickle.dump({"metainfo": METAINFO, "data_list": data_list}, handle, protocol=4)
        summary[split] = {"scans": count, "mean_points": float(np.mean(points_per_scan)) if count else 0.0,
                          "class_counts": class_counts}
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    return {**summary, "generated": True}
