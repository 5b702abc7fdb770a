"""Distillation terms (trainer.terms) on plain tensors, each against a reference computed another way."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.bev_warp import BevAlignment, gaussian_foreground
from trainer.targets import TeacherMaps
from trainer.terms import TERMS, DistillStep, LayerStep, TermContext, build_term, parse_kd_spec
from trainer.terms.crd import CRDLoss

RANGE = [-8.0, -8.0, 8.0, 8.0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _step(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None,
          boxes: list[torch.Tensor] | None = None, teacher_range=RANGE, meta: dict | None = None) -> DistillStep:
    batch, _, height, width = student.shape
    alignments = [BevAlignment(teacher_range, tuple(teacher.shape[-2:]), RANGE, (height, width), meta or {})
                  for _ in range(batch)]
    grid_valid = torch.stack([a.valid.reshape(height, width) for a in alignments])
    valid = grid_valid if valid is None else valid & grid_valid
    layer = LayerStep(key="neck", student=student, teacher=TeacherMaps(list(teacher)), alignments=alignments,
                      valid=valid, foreground=torch.zeros(batch, height, width),
                      boxes=boxes or [torch.zeros(0, 4)] * batch, rows=torch.arange(batch))
    return DistillStep([layer])


def _context(cs: int, ct: int, num_samples: int = 8) -> TermContext:
    return TermContext(channels={"neck": (cs, ct)}, num_samples=num_samples)


def test_kd_spec_parses_weights_and_names_the_valid_terms():
    assert parse_kd_spec("infonce=1,pkd=5") == {"infonce": 1.0, "pkd": 5.0}
    assert parse_kd_spec("crd") == {"crd": 1.0}
    with pytest.raises(ValueError, match="choose from crd, heatmap, infonce, label, mse, pkd, reg"):
        parse_kd_spec("infonse=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_kd_spec("pkd=x")
    # a term's parameters follow its weight: one recipe string, whatever the student config says
    assert parse_kd_spec("heatmap=2:loss=focal:beta=1.5:confidence_weighted=false,reg") == {
        "heatmap": {"weight": 2.0, "loss": "focal", "beta": 1.5, "confidence_weighted": False}, "reg": 1.0}
    with pytest.raises(ValueError, match="'gamma=2' is not PARAMETER=VALUE of 'heatmap', which takes loss, "
                                         "confidence_weighted, gt_weight, beta, peak_threshold"):
        parse_kd_spec("heatmap=1:gamma=2")
    with pytest.raises(ValueError, match="'focal' is not PARAMETER=VALUE"):
        parse_kd_spec("heatmap=1:focal")
    with pytest.raises(ValueError, match="unknown distillation term"):
        build_term("nope", _context(4, 4))
    with pytest.raises(ValueError, match="has no parameter tau; it takes feat_dim, temperature"):
        build_term("crd", _context(4, 4), tau=1.0)
    assert set(TERMS) == {"crd", "heatmap", "infonce", "label", "mse", "pkd", "reg"}


def test_crd_term_needs_two_rows_and_says_what_to_use_instead():
    with pytest.raises(ValueError, match="at least 2 cached samples.*--kd infonce=1"):
        build_term("crd", _context(4, 4, num_samples=1))


def _mmrazor_norm(feat: torch.Tensor) -> torch.Tensor:
    # mmrazor's PKDLoss.norm (eps 0): per channel over batch and cells, torch.std (unbiased)
    n, c, h, w = feat.shape
    flat = feat.permute(1, 0, 2, 3).reshape(c, -1)
    flat = (flat - flat.mean(dim=-1, keepdim=True)) / flat.std(dim=-1, keepdim=True)
    return flat.reshape(c, n, h, w).permute(1, 0, 2, 3)


def test_pkd_is_one_minus_pearson_per_channel_over_valid_cells():
    student, teacher = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    teacher[:, 1] = 4 * student[:, 1] + 7  # perfectly correlated channel: no loss from it
    valid = torch.rand(2, 6, 6) > 0.3
    term = build_term("pkd", _context(3, 3), eps=0.0, cells_per_sample=0).double()
    loss = float(term(_step(student, teacher, valid))["neck"])
    # reference: Pearson's r per channel over the valid cells of the whole batch, by numpy
    s = student.permute(1, 0, 2, 3).numpy()[:, valid.numpy()]
    t = teacher.permute(1, 0, 2, 3).numpy()[:, valid.numpy()]
    n = s.shape[1]
    expected = np.mean([(n - 1) / n * (1 - np.corrcoef(s[c], t[c])[0, 1]) for c in range(3)])
    assert loss == pytest.approx(expected, rel=1e-6)  # teacher cells are read in float32, as from a cache
    # mmrazor's PKDLoss on a fully valid map: F.mse_loss of the standardised maps / 2
    everywhere = torch.ones(2, 6, 6, dtype=torch.bool)
    mmrazor = F.mse_loss(_mmrazor_norm(student), _mmrazor_norm(teacher)) / 2
    assert float(term(_step(student, teacher, everywhere))["neck"]) == pytest.approx(float(mmrazor), rel=1e-6)


def test_pkd_adapts_student_channels_and_ignores_teacher_scale():
    student, teacher = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    term = build_term("pkd", _context(5, 3))
    step = _step(student, teacher)
    scaled = _step(student, teacher * 100 - 3)
    assert torch.allclose(term(step)["neck"], term(scaled)["neck"], atol=1e-5)
    term(step)["neck"].backward()
    assert term.adapters["neck"].weight.grad.abs().sum() > 0


def test_mse_term_is_masked_mean_squared_error_through_its_adapter():
    student, teacher = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    valid = torch.rand(2, 5, 5) > 0.5
    term = build_term("mse", _context(4, 4), cells_per_sample=0).double()
    with torch.no_grad():  # adapter = identity, so the reference is plain masked MSE
        term.adapters["neck"].weight.copy_(torch.eye(4, dtype=torch.float64)[:, :, None, None])
        term.adapters["neck"].bias.zero_()
    loss = float(term(_step(student, teacher, valid))["neck"])
    diff = (student - teacher).numpy() ** 2
    mask = valid.numpy()
    expected = sum(diff[b, :, i, j].sum() for b in range(2) for i in range(5) for j in range(5) if mask[b, i, j])
    assert loss == pytest.approx(expected / (mask.sum() * 4), rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "pkd"])
def test_regression_terms_sample_valid_cells_without_decoding_whole_maps(name, monkeypatch):
    # at BEVFusion sizes decoding and warping every map each step cost 2-5x the student's step: the
    # regression terms read only the teacher cells they compare, and their sampled loss estimates the
    # all-cell loss without bias
    student, teacher = torch.randn(2, 4, 12, 12, dtype=torch.float64), torch.randn(2, 4, 12, 12, dtype=torch.float64)
    valid = torch.rand(2, 12, 12) > 0.4
    term = build_term(name, _context(4, 4), cells_per_sample=0).double()
    exact = float(term(_step(student, teacher, valid))["neck"])
    monkeypatch.setattr(TeacherMaps, "decoded", lambda *a: pytest.fail("a whole teacher map was decoded"))
    sampled = build_term(name, _context(4, 4), cells_per_sample=16).double()
    sampled.load_state_dict(term.state_dict())
    step = _step(student, teacher, valid)
    pairs = step.layers[0].regression_pairs(16)
    assert pairs[0].shape == (32, 4) and pairs[1].shape == (32, 4)
    # every compared cell is valid: an invalid cell's student vector would not be among the valid ones
    valid_vectors = student.permute(0, 2, 3, 1)[valid]
    assert all((valid_vectors == row).all(dim=1).any() for row in pairs[0].detach())
    draws = [float(sampled(_step(student, teacher, valid))["neck"]) for _ in range(400)]
    assert np.mean(draws) == pytest.approx(exact, rel=0.03 if name == "mse" else 0.08)
    assert np.std(draws) > 0  # they really are draws


def test_crd_term_contrasts_valid_cell_means():
    student, teacher = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    valid = torch.rand(3, 4, 4) > 0.4
    term = build_term("crd", _context(6, 6, num_samples=10), feat_dim=8, nce_k=5)
    reference = copy.deepcopy(term)
    loss = term(_step(student, teacher, valid))["neck"]
    # reference: pool by hand over the valid cells, project, score with a copy of the same CRD state
    weights = valid.flatten(1).float()
    pooled_s = (student.flatten(2) * weights[:, None]).sum(2) / weights.sum(1, keepdim=True)
    pooled_t = (teacher.flatten(2) * weights[:, None]).sum(2) / weights.sum(1, keepdim=True)
    heads = reference.heads["neck"]
    crd: CRDLoss = reference.criteria["neck"]
    expected = crd(heads["student"](pooled_s), heads["teacher"](pooled_t), torch.arange(3))
    torch.testing.assert_close(loss, expected)


def _info_nce_reference(query: np.ndarray, key: np.ndarray, temperature: float) -> float:
    total = 0.0
    for i in range(len(query)):
        logits = [float(query[i] @ key[j]) / temperature for j in range(len(key))]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / len(query)


def test_infonce_term_cells_and_instances_against_loops_boxes_off_grid_left_out():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 6, 8, 8, dtype=torch.float64), torch.randn(1, 6, 8, 8, dtype=torch.float64)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[:, :, 6:] = False  # e.g. outside the teacher's grid
    boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 5.0, 4.0], [6.2, 1.0, 7.8, 3.0]], dtype=torch.float64)]
    term = build_term("infonce", _context(6, 6), feat_dim=4, cells_per_sample=1000).double()
    loss = float(term(_step(student, teacher, valid, boxes))["neck"])
    heads = term.heads["neck"]
    project = lambda head, x: head(x).detach().numpy()  # noqa: E731
    cells = valid[0].flatten().nonzero().flatten()  # every valid cell is drawn (InfoNCE is order-free)
    s_cells, t_cells = student[0].flatten(1)[:, cells].T, teacher[0].flatten(1)[:, cells].T
    expected = _info_nce_reference(project(heads["student"], s_cells), project(heads["teacher"], t_cells), 0.07)
    # instances: the third box lies in the invalid columns 6-7 and is left out; the others are means
    # over the cells they cover: rows 0-1 x cols 0-1, rows 3 x cols 3-4
    box_cells = [[r * 8 + c for r in (0, 1) for c in (0, 1)], [3 * 8 + 3, 3 * 8 + 4]]
    s_means = torch.stack([student[0].flatten(1)[:, idx].mean(1) for idx in box_cells])
    t_means = torch.stack([teacher[0].flatten(1)[:, idx].mean(1) for idx in box_cells])
    s_emb = F.normalize(heads["student"](s_means), dim=1).detach().numpy()
    t_emb = F.normalize(heads["teacher"](t_means), dim=1).detach().numpy()
    expected += _info_nce_reference(s_emb, t_emb, 0.07)
    assert loss == pytest.approx(expected, rel=1e-7)


def test_every_term_backpropagates_into_student_and_runs_on_stored_int8_targets():
    from featcache import codecs

    spec = codecs.parse_codec("int8-zstd3")
    teacher = torch.randn(2, 5, 8, 8)
    stored, qparams = zip(*(codecs.encode(map_.numpy(), spec) for map_ in teacher))
    maps = TeacherMaps([torch.from_numpy(s) for s in stored], spec, [torch.from_numpy(q) for q in qparams])
    for name in sorted(TERMS):
        if not TERMS[name].kinds:  # label KD: targets for the detection loss, no loss of its own (test_label_kd)
            continue
        student = torch.randn(2, 3, 8, 8, requires_grad=True)
        step = _step(student, teacher, boxes=[torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 6.0, 7.0]])] * 2)
        step.layers[0].teacher = maps
        step.layers[0].foreground = torch.rand(2, 8, 8)
        if "heatmap" in TERMS[name].kinds:  # a response term reads heatmap pairs: classes 0, 2 of the teacher's
            step.layers[0].kind, step.layers[0].channel_map = "heatmap", torch.tensor([0, 2, -1])
        elif "dim" in TERMS[name].kinds:  # regression outputs: a 3-channel "dim" map at the boxes' centres
            three = [codecs.encode(map_[:3].numpy(), spec) for map_ in teacher]
            step.layers[0].kind = "dim"
            step.layers[0].teacher = TeacherMaps([torch.from_numpy(s) for s, _ in three], spec,
                                                 [torch.from_numpy(q) for _, q in three])
        term = build_term(name, _context(3, 5))
        loss = term(step)["neck"]
        assert torch.isfinite(loss), name
        loss.backward()
        assert student.grad.abs().sum() > 0, name


def test_gaussian_foreground_matches_mmdet3d_centerhead_targets():
    from mmdet3d.models.utils import draw_heatmap_gaussian, gaussian_radius

    # a 4.5 x 1.9 m car and a 0.7 x 0.7 m pedestrian on 1.28 m cells, centred on cell centres
    bev, size = [-32.0, -32.0, 32.0, 32.0], 50
    cell = 64 / size
    boxes = torch.tensor([[(10 + 0.5) * cell - 32, (20 + 0.5) * cell - 32, 4.5, 1.9, 0.0],
                          [(30 + 0.5) * cell - 32, (5 + 0.5) * cell - 32, 0.7, 0.7, 0.0]])
    ours = gaussian_foreground(bev, size, size, boxes, min_radius=2, min_overlap=0.1)
    reference = torch.zeros(size, size)
    for x, y, length, width, _ in boxes.tolist():
        radius = max(2, int(gaussian_radius((torch.tensor(width / cell), torch.tensor(length / cell)), min_overlap=0.1)))
        draw_heatmap_gaussian(reference, torch.tensor([round((x + 32) / cell - 0.5), round((y + 32) / cell - 0.5)]),
                              radius)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)  # float32 box centres
    assert ours[5, 30] == 1 and (ours > 0.1).sum() >= 9  # the pedestrian weighs a few cells, not none


def test_border_cells_read_the_edge_value_not_zero_padding():
    # student at twice the teacher's resolution over the same range: its edge cells' sources lie within
    # half a teacher cell of the grid's edge, where zero padding would read 0.75 of the value
    teacher = torch.ones(2, 8, 8)
    alignment = BevAlignment(RANGE, (8, 8), RANGE, (16, 16), {})
    assert alignment.valid.all()
    torch.testing.assert_close(alignment.warp(teacher), torch.ones(2, 16, 16))
    cells = torch.arange(256)
    read = TeacherMaps([teacher]).read(0, alignment.read_matrix(cells))
    torch.testing.assert_close(read, torch.ones(256, 2))
    torch.testing.assert_close(alignment.splat(torch.ones(256)).sum(), torch.tensor(256.0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(1 / (1 + np.exp(-x)), 1e-4, 1 - 1e-4)


def _flipped_heatmap_step(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> DistillStep:
    """A heatmap pair of teacher classes (car, truck, ped) and student classes (ped, bus, car: bus has no teacher
    channel) on a vertically flipped sample (y -> -y: rows reversed), with a random GT Gaussian."""
    step = _step(student, teacher, valid, meta={"transformation_3d_flow": ["HF"]})
    layer = step.layers[0]
    layer.kind, layer.channel_map = "heatmap", torch.tensor([2, -1, 0])
    layer.foreground = torch.rand(2, 8, 8)
    return step


@pytest.mark.parametrize("loss, gt_weight", [("mse", 0.0), ("l1", 0.0), ("mse", 8.0)])
def test_heatmap_term_compares_matched_class_scores_on_the_augmented_grid(loss, gt_weight):
    teacher = torch.randn(2, 3, 8, 8) * 3
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    valid = torch.rand(2, 8, 8) > 0.2
    step = _flipped_heatmap_step(student, teacher, valid)
    layer = step.layers[0]
    value = build_term("heatmap", _context(3, 3), loss=loss, gt_weight=gt_weight)(step)["neck"]
    # reference in numpy: the flipped teacher's sigmoid scores of the shared classes, weighted by their max
    t = _sigmoid(teacher.numpy()[:, :, ::-1, :])[:, [2, 0]]
    s = _sigmoid(student.detach().numpy())[:, [0, 2]]
    w = valid.numpy() * t.max(axis=1) * (1 + gt_weight * layer.foreground.numpy())
    d = (s - t) ** 2 if loss == "mse" else np.abs(s - t)
    assert float(value) == pytest.approx(float((w * d.sum(axis=1)).sum() / w.sum()), rel=1e-5)
    value.backward()
    assert student.grad[:, 1].abs().sum() == 0 and student.grad[:, [0, 2]].abs().sum() > 0  # bus: no target


def test_terms_read_only_the_pairs_of_their_kind():
    student, teacher = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    feature = _step(student, teacher).layers[0]
    heatmap = copy.copy(feature)
    heatmap.key, heatmap.kind, heatmap.channel_map = "hm", "heatmap", torch.tensor([0, 1, 2])
    step = DistillStep([feature, heatmap])
    assert set(build_term("heatmap", _context(3, 3))(step)) == {"hm"}
    assert set(build_term("pkd", _context(3, 3))(step)) == {"neck"}
    # identical scores: no loss; no class in common: zero, not NaN
    same = _step(teacher.clone(), teacher).layers[0]
    same.kind, same.channel_map = "heatmap", torch.tensor([0, 1, 2])
    assert float(build_term("heatmap", _context(3, 3))(DistillStep([same]))["neck"]) == pytest.approx(0, abs=1e-7)
    same.channel_map = torch.tensor([-1, -1, -1])
    assert float(build_term("heatmap", _context(3, 3))(DistillStep([same]))["neck"]) == 0
    with pytest.raises(ValueError, match="'mse' \\(SparseKD\\), 'l1' \\(UniDistill\\), 'focal'"):
        build_term("heatmap", _context(3, 3), loss="kl")
    with pytest.raises(ValueError, match="confidence_weighted applies to loss='mse' or 'l1'"):
        build_term("heatmap", _context(3, 3), loss="focal", confidence_weighted=True)


@pytest.mark.parametrize("loss, beta, gt_weight", [("focal", 2.0, 0.0), ("focal", 1.0, 4.0), ("bce", 2.0, 0.0)])
def test_soft_target_heatmap_losses_match_mmdets_quality_focal_loss_per_teacher_peak(loss, beta, gt_weight):
    from mmdet.models.losses.gfocal_loss import quality_focal_loss_tensor_target

    teacher = torch.randn(2, 3, 8, 8) * 3 - 3
    teacher[0, 0, 2, 3] = teacher[1, 2, 5, 5] = teacher[1, 2, 6, 1] = 4.0  # confident objects
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    valid = torch.rand(2, 8, 8) > 0.1
    step = _flipped_heatmap_step(student, teacher, valid)
    layer = step.layers[0]
    term = build_term("heatmap", _context(3, 3), loss=loss, beta=beta, gt_weight=gt_weight, peak_threshold=0.3)
    value = term(step)["neck"]
    # reference: mmdet's quality focal loss (GFL) per cell over the shared classes, soft targets the flipped
    # teacher's scores; normalised by the teacher's 3x3 peaks >= 0.3 on valid cells, counted in numpy
    t = torch.from_numpy(_sigmoid(teacher.numpy()[:, :, ::-1, :])[:, [2, 0]].copy())
    s = student.detach()[:, [0, 2]]
    per_cell = quality_focal_loss_tensor_target(s.permute(0, 2, 3, 1).reshape(-1, 2), t.permute(0, 2, 3, 1).reshape(-1, 2),
                                                beta=0.0 if loss == "bce" else beta, reduction="none").reshape(2, 8, 8)
    w = valid.float() * (1 + gt_weight * layer.foreground)
    tn = t.numpy()
    padded = np.pad(tn, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1)
    neighbourhood = np.max([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)], axis=0)
    peaks = int(((tn >= neighbourhood) & (tn >= 0.3) & valid.numpy()[:, None]).sum())
    assert peaks >= 3
    assert float(value) == pytest.approx(float((w * per_cell).sum()) / peaks, rel=1e-5)
    value.backward()
    assert student.grad[:, 1].abs().sum() == 0 and student.grad[:, [0, 2]].abs().sum() > 0  # bus: no target


def test_the_focal_heatmap_loss_still_teaches_an_object_the_student_misses():
    # the student scores 0.01 where the teacher scores 0.9: the score MSE's gradient per logit vanishes
    # (2 (s - t) s (1 - s) = -0.018), the soft-target focal loss's does not (its BCE part alone is s - t)
    teacher = torch.full((1, 1, 5, 5), -6.0)
    teacher[0, 0, 2, 2] = math.log(0.9 / 0.1)
    gradients = {}
    for loss in ("mse", "focal"):
        student = torch.full((1, 1, 5, 5), -6.0)
        student[0, 0, 2, 2] = math.log(0.01 / 0.99)
        student.requires_grad_(True)
        step = _step(student, teacher)
        step.layers[0].kind, step.layers[0].channel_map = "heatmap", torch.tensor([0])
        build_term("heatmap", _context(1, 1), loss=loss)(step)["neck"].backward()
        gradients[loss] = float(student.grad[0, 0, 2, 2])
    assert -0.05 < gradients["mse"] < 0 and gradients["focal"] < -0.5


def test_every_terms_cells_of_a_layer_are_gathered_once_with_the_gradients_of_separate_gathers(monkeypatch):
    # each differentiable gather's backward fills a zero gradient of the whole batch map (a 512x512 pillar
    # grid at BEV sizes): the terms of one step request their cells first and share one gather per layer
    import trainer.terms.base as terms_module  # LayerStep.vectors gathers there

    calls = []
    real_gather = terms_module.gather_cells
    monkeypatch.setattr(terms_module, "gather_cells", lambda maps, cells: calls.append(1) or real_gather(maps, cells))
    student = torch.randn(2, 4, 10, 10, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    boxes = [torch.tensor([[1.0, 1.0, 3.0, 4.0], [5.0, 5.0, 8.0, 7.0]], dtype=torch.float64)] * 2
    terms = [build_term(name, _context(4, 4), **params).double()
             for name, params in (("infonce", dict(feat_dim=4)), ("pkd", {}), ("mse", {}))]
    shared = _step(student, teacher, boxes=boxes)
    shared.plan(terms)
    total = sum(value for term in terms for value in term(shared).values())
    (gradient,) = torch.autograd.grad(total, student)
    assert len(calls) == 1  # infonce's cells and the uniform cells pkd and mse share, in one gather
    # the same cells, each term gathering its own
    calls.clear()
    separate = _step(student, teacher, boxes=boxes)
    layer, requests = separate.layers[0], shared.layers[0]._requests
    separate_total = 0
    for term in terms:
        key = term.name if term.name == "infonce" else layer.uniform_key(512)
        if key not in layer._requests:
            layer.request(key, *requests[key])
        separate_total = separate_total + sum(term(separate).values())
    (expected,) = torch.autograd.grad(separate_total, student)
    assert len(calls) == 2  # infonce's, then the uniform cells (mse reuses pkd's)
    torch.testing.assert_close(separate_total, total)
    torch.testing.assert_close(gradient, expected)
    assert gradient.abs().sum() > 0


def test_terms_read_score8_heatmaps_and_cells_as_their_decoded_maps():
    # score8 (class heatmaps) is not affine: read() and weighted_sum() decode the cells they touch first
    from featcache import codecs

    spec = codecs.parse_codec("score8-zstd3")
    logits = torch.randn(2, 3, 9, 9) * 4
    stored = [torch.from_numpy(codecs.encode(map_.numpy(), spec)[0]) for map_ in logits]
    maps = TeacherMaps(stored, spec)
    decoded = torch.stack([maps.decoded(index) for index in range(2)])
    # within 1/510 of every score, and the affine shortcut refuses the codec
    assert (torch.sigmoid(decoded) - torch.sigmoid(logits)).abs().max() <= 1 / 510 + 1e-6
    with pytest.raises(ValueError, match="does not decode by an affine map"):
        codecs.affine_tensors(spec, None)
    step = _step(torch.zeros(2, 3, 9, 9), logits, meta={"transformation_3d_flow": ["R"], "pcd_rotation":
                                                        torch.tensor([[0.8, 0.6, 0.0], [-0.6, 0.8, 0.0], [0, 0, 1.0]])})
    alignment = step.layers[0].alignments[0]
    cells = torch.tensor([0, 10, 40, 80])
    warped = alignment.warp(decoded[0]).flatten(1)[:, cells].T  # bilinear, border padding: the dense reference
    torch.testing.assert_close(maps.read(0, alignment.read_matrix(cells)), warped, rtol=1e-5, atol=1e-5)
    weights = torch.rand(81)
    torch.testing.assert_close(maps.weighted_sum(1, weights), decoded[1].flatten(1) @ weights)
