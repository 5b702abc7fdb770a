"""Projection heads and distillation losses, each checked against a hand-written numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.heads import ProjectionMLP, head_key, heads_for, match_resolution
from trainer.terms.cells import gather_cells, pool_boxes, sample_cells
from trainer.terms.crd import CRDLoss, nce_loss
from trainer.terms.infonce import InfoNCELoss, instance_infonce
from trainer.terms.mse import MaskedMSELoss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(*shape: int, dim: int = -1) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=dim)


def _log_softmax_ce(logits: np.ndarray) -> float:
    """Mean over rows of -log softmax(row)[row index], by explicit loops."""
    total = 0.0
    for i, row in enumerate(logits):
        total -= row[i] - math.log(sum(math.exp(v) for v in row))
    return total / len(logits)


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("shape", [(2, 48, 5, 7), (3, 48)])
def test_projection_shapes_unit_norm_and_gradients(shape):
    head = ProjectionMLP(48, feat_dim=16)
    x = torch.randn(*shape, requires_grad=True)
    out = head(x)
    assert out.shape == (shape[0], 16, *shape[2:])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(out.shape[:1] + out.shape[2:]))
    (out[:, 0] * torch.randn_like(out[:, 0])).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_projection_pooled_vector_equals_one_cell_map():
    head = ProjectionMLP(32, feat_dim=8).eval()
    vec = torch.randn(4, 32)
    torch.testing.assert_close(head(vec), head(vec[:, :, None, None])[:, :, 0, 0])


def test_projection_hidden_default_and_groupnorm_groups():
    assert ProjectionMLP(512, feat_dim=128).hidden == 256
    assert ProjectionMLP(64, feat_dim=128).hidden == 128
    norm = ProjectionMLP(64, feat_dim=16, hidden=16).net[1]
    assert norm.num_channels // norm.num_groups >= 4  # a pooled vector keeps per-group variance
    with pytest.raises(ValueError):
        ProjectionMLP(8)(torch.randn(2, 8, 3))


def test_heads_for_sizes_from_probed_shapes_and_sanitises_keys():
    student = {"pts_neck.blocks.0": (64, 100, 100), "pts_backbone.blocks.1": (128, 50, 50)}
    teacher = {"pts_neck": (384, 180, 180), "pts_backbone.blocks.2": (256, 90, 90)}
    pairs = {"pts_neck.blocks.0": "pts_neck", "pts_backbone.blocks.1": "pts_backbone.blocks.2"}
    heads = heads_for(student, teacher, pairs, feat_dim=32)
    assert set(heads.keys()) == {"pts_neck__blocks__0", "pts_backbone__blocks__1"}
    pair = heads[head_key("pts_neck.blocks.0")]
    assert pair["student"].in_channels == 64 and pair["teacher"].in_channels == 384
    assert heads["pts_backbone__blocks__1"]["teacher"].in_channels == 256
    out = pair["student"](torch.randn(1, 64, 10, 10))
    assert out.shape == (1, 32, 10, 10)
    assert any(".student." in k for k in heads.state_dict())


def test_heads_for_rejects_missing_shapes_and_key_collisions():
    with pytest.raises(ValueError, match="no probed shape"):
        heads_for({"a": (8, 4, 4)}, {}, {"a": "t"})
    with pytest.raises(ValueError, match="both map"):
        heads_for({"a.b": (8, 4, 4), "a__b": (8, 4, 4)}, {"t": (8, 4, 4)}, {"a.b": "t", "a__b": "t"})


def test_match_resolution_downsamples_by_area():
    student = torch.randn(1, 2, 6, 9, dtype=torch.float64)
    teacher = torch.zeros(1, 2, 2, 3)
    resampled, same_teacher = match_resolution(student, teacher)
    assert same_teacher is teacher
    expected = student.numpy().reshape(1, 2, 2, 3, 3, 3).mean(axis=(3, 5))  # 3x3 block means
    np.testing.assert_allclose(resampled.numpy(), expected)


def _bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear resize of a (H, W) array by explicit loops."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            y0, x0 = min(int(y), in_h - 1), min(int(x), in_w - 1)
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * img[y0, x0] + dx * img[y0, x1])
                         + dy * ((1 - dx) * img[y1, x0] + dx * img[y1, x1]))
    return out


def test_match_resolution_upsamples_bilinearly_and_passes_gradient():
    student = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.zeros(1, 1, 6, 8, dtype=torch.float64)
    resampled, _ = match_resolution(student, teacher)
    np.testing.assert_allclose(resampled[0, 0].detach().numpy(),
                               _bilinear_reference(student[0, 0].detach().numpy(), 6, 8), atol=1e-12)
    resampled.sum().backward()
    assert student.grad.shape == student.shape and (student.grad > 0).all()
    same, _ = match_resolution(teacher, teacher)
    assert same is teacher


# ---------------------------------------------------------------- CRD

def _crd_reference(mem_s, mem_t, emb_s, emb_t, idx, cidx, temp, momentum, n_data, z=None):
    """Scores, NCE loss, Z and updated banks of one CRD step, by explicit loops."""
    bsz, k1 = cidx.shape
    out_s, out_t = np.zeros((bsz, k1)), np.zeros((bsz, k1))
    for b in range(bsz):
        for j in range(k1):
            out_s[b, j] = math.exp(float(np.dot(mem_t[cidx[b, j]], emb_s[b])) / temp)
            out_t[b, j] = math.exp(float(np.dot(mem_s[cidx[b, j]], emb_t[b])) / temp)
    z_s, z_t = z if z is not None else (out_s.mean() * n_data, out_t.mean() * n_data)
    p_n, m = 1.0 / n_data, k1 - 1
    loss = 0.0
    for scores in (out_s / z_s, out_t / z_t):
        total = 0.0
        for b in range(bsz):
            total += math.log(scores[b, 0] / (scores[b, 0] + m * p_n + 1e-7))
            for j in range(1, k1):
                total += math.log(m * p_n / (scores[b, j] + m * p_n + 1e-7))
        loss += -total / bsz
    new_s, new_t = mem_s.copy(), mem_t.copy()
    for bank, emb in ((new_s, emb_s), (new_t, emb_t)):
        for b, row in enumerate(idx):
            v = bank[row] * momentum + emb[b] * (1 - momentum)
            bank[row] = v / np.sqrt((v ** 2).sum())
    return loss, (z_s, z_t), new_s, new_t


def test_crd_matches_reference_and_fixes_z_after_first_batch():
    n_data, dim, temp, momentum = 7, 4, 0.2, 0.3
    crd = CRDLoss(dim, n_data, nce_k=3, temperature=temp, momentum=momentum).double()
    stdv = 1 / math.sqrt(dim / 3)
    assert crd.memory.memory_s.abs().max() <= stdv and crd.memory.memory_t.abs().max() <= stdv
    batches = [(torch.tensor([2, 5]), torch.tensor([[2, 0, 6, 3], [5, 1, 2, 2]])),
               (torch.tensor([5, 0]), torch.tensor([[5, 4, 4, 6], [0, 3, 5, 1]]))]
    z = None
    for step, (idx, cidx) in enumerate(batches):
        emb_s, emb_t = _unit(2, dim), _unit(2, dim)
        mem_s, mem_t = crd.memory.memory_s.numpy().copy(), crd.memory.memory_t.numpy().copy()
        ref_loss, ref_z, ref_s, ref_t = _crd_reference(mem_s, mem_t, emb_s.numpy(), emb_t.numpy(), idx.numpy(),
                                                       cidx.numpy(), temp, momentum, n_data, z)
        loss = crd(emb_s, emb_t, idx, cidx)
        np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
        np.testing.assert_allclose([crd.memory.z_s.item(), crd.memory.z_t.item()], ref_z, rtol=1e-5)
        np.testing.assert_allclose(crd.memory.memory_s.numpy(), ref_s, atol=1e-5)
        np.testing.assert_allclose(crd.memory.memory_t.numpy(), ref_t, atol=1e-5)
        torch.testing.assert_close(crd.memory.memory_s[idx].norm(dim=1), torch.ones(2, dtype=torch.float64))
        untouched = [i for i in range(n_data) if i not in idx.tolist()]
        np.testing.assert_array_equal(crd.memory.memory_s.numpy()[untouched], mem_s[untouched])
        if step == 0:
            z = ref_z
        else:  # the second batch was normalised with the first batch's constants
            np.testing.assert_allclose(ref_z, z)


def test_nce_loss_matches_closed_form():
    scores = torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64)
    noise = 2 / 10
    expected = -(math.log(0.3 / (0.3 + noise + 1e-7)) + math.log(noise / (0.1 + noise + 1e-7))
                 + math.log(noise / (0.2 + noise + 1e-7)))
    assert nce_loss(scores, 10).item() == pytest.approx(expected, rel=1e-12)


def test_crd_buffers_checkpoint_and_sampling():
    crd = CRDLoss(8, n_data=10)  # nce_k 4096 clamped for a tiny dataset
    assert crd.memory.nce_k == 9
    assert (crd.memory.temperature, crd.memory.momentum) == (0.07, 0.5)
    state = crd.state_dict()
    assert {"memory.memory_s", "memory.memory_t", "memory.z_s", "memory.z_t"} <= set(state)
    assert state["memory.memory_s"].shape == (10, 8) and crd.memory.z_s.item() == -1
    idx = torch.tensor([3, 7, 1])
    emb_s, bank_t = _unit(3, 8).float(), crd.memory.memory_t.clone()
    scores_s, scores_t = crd.memory(emb_s, _unit(3, 8).float(), idx)  # negatives drawn internally
    assert scores_s.shape == scores_t.shape == (3, 10)
    assert crd.memory.z_s.item() > 0 and crd.memory.z_t.item() > 0
    positive = torch.exp((bank_t[idx] * emb_s).sum(1) / 0.07) / crd.memory.z_s  # column 0 is idx itself
    torch.testing.assert_close(scores_s[:, 0], positive)

    resumed = CRDLoss(8, n_data=10)
    resumed.load_state_dict(crd.state_dict())
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        torch.testing.assert_close(getattr(resumed.memory, name), getattr(crd.memory, name))
    z_before = resumed.memory.z_s.clone()
    resumed(_unit(3, 8).float(), _unit(3, 8).float(), idx)
    assert resumed.memory.z_s == z_before  # a resumed run keeps its constants

    drawn = []
    crd.memory.gather = lambda t: (drawn.append(t.shape[0]), t)[1]  # the DDP hook sees the update inputs
    crd(_unit(3, 8).float(), _unit(3, 8).float(), idx)
    assert drawn == [3, 3, 3]


def test_crd_loss_decreases_when_student_moves_toward_teacher():
    n_data, dim = 8, 16
    crd = CRDLoss(dim, n_data, temperature=0.1)
    teacher = _unit(n_data, dim).float()
    student = torch.randn(n_data, dim, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.05)
    idx = torch.arange(n_data)
    cidx = torch.stack([torch.cat([idx[i:i + 1], idx[idx != i]]) for i in range(n_data)])
    losses = []
    for _ in range(40):
        loss = crd(F.normalize(student, dim=1), teacher, idx, cidx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[1:6])
    cos = F.normalize(student.detach(), dim=1) @ teacher.T
    assert (cos.argmax(dim=1) == idx).all()  # each student embedding found its own teacher


# ---------------------------------------------------------------- InfoNCE

@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_hand_cross_entropy(symmetric):
    temp = 0.1
    student, teacher = _unit(2, 4, 3, 5, dim=1), _unit(2, 4, 3, 5, dim=1)
    cells = [torch.tensor([0, 7, 14, 3]), torch.tensor([9, 1, 12])]
    loss = InfoNCELoss(temperature=temp, symmetric=symmetric)(student, teacher, cells=cells)
    per_sample = []
    for b, idx in enumerate(cells):
        s = student[b].reshape(4, -1).numpy()[:, idx.numpy()]
        t = teacher[b].reshape(4, -1).numpy()[:, idx.numpy()]
        logits = np.array([[float(np.dot(s[:, i], t[:, j])) / temp for j in range(len(idx))]
                           for i in range(len(idx))])
        ce = _log_softmax_ce(logits)
        per_sample.append((ce + _log_softmax_ce(logits.T)) / 2 if symmetric else ce)
    np.testing.assert_allclose(loss.item(), np.mean(per_sample), rtol=1e-10)


def test_infonce_projecting_sampled_cells_equals_projecting_whole_maps():
    """project= (the distiller's path) projects only the sampled cells' vectors; with a per-cell
    projection that must equal projecting every cell first, the student keeping its own width."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 5, 7), torch.randn(2, 10, 5, 7)
    w_s, w_t = torch.randn(6, 4), torch.randn(10, 4)
    project = (lambda v: F.normalize(v @ w_s, dim=1), lambda v: F.normalize(v @ w_t, dim=1))
    cells = [torch.tensor([0, 8, 20, 33, 4]), torch.tensor([1, 2, 30])]
    whole_s = F.normalize(torch.einsum("bchw,cd->bdhw", student, w_s), dim=1)
    whole_t = F.normalize(torch.einsum("bchw,cd->bdhw", teacher, w_t), dim=1)
    criterion = InfoNCELoss(temperature=0.07)
    expected = criterion(whole_s, whole_t, cells=cells)
    assert criterion(student, teacher, cells=cells, project=project).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="project"):
        criterion(student, teacher, cells=cells)


def test_infonce_sampling_respects_valid_mask_and_backpropagates():
    student = _unit(2, 8, 16, 16, dim=1).requires_grad_()
    teacher = _unit(2, 8, 16, 16, dim=1)
    valid = torch.rand(2, 16, 16) > 0.4
    fg = torch.zeros(2, 16, 16)
    fg[:, 4:8, 4:8] = 1
    valid[1] = False  # nothing cached for sample 1: it is skipped
    for _ in range(50):
        idx = sample_cells(valid[0], 32, fg[0])
        assert len(idx) == 32 and len(set(idx.tolist())) == 32
        assert valid[0].flatten()[idx].all()
    assert len(sample_cells(valid[0], 10_000, fg[0])) == int(valid[0].sum())
    assert sample_cells(valid[1], 8).numel() == 0
    loss = InfoNCELoss(num_samples=32)(student, teacher, fg_weight=fg, valid=valid)
    loss.backward()
    assert student.grad[0].abs().sum() > 0 and student.grad[1].abs().sum() == 0
    empty = InfoNCELoss()(student, teacher, valid=torch.zeros(2, 16, 16, dtype=torch.bool))
    assert empty.item() == 0 and empty.requires_grad


def test_sampling_oversamples_foreground_as_documented():
    valid = torch.ones(64, 64, dtype=torch.bool)
    fg = torch.zeros(64, 64)
    fg[8:24, 8:24] = 1  # 256 of 4096 cells: 6.25 % of the area
    is_fg = fg.flatten() > 0
    area = is_fg.float().mean().item()
    shares = {f: np.mean([is_fg[sample_cells(valid, 16, fg, f)].float().mean().item() for _ in range(300)])
              for f in (0.0, 0.5)}
    assert abs(shares[0.0] - area) < 0.02
    assert abs(shares[0.5] - (0.5 + 0.5 * area)) < 0.04
    fg[8:24, 8:16] = 3  # weight 3 on half the box: 3x the draws of the other half
    heavy = fg.flatten() == 3
    draws = torch.cat([sample_cells(valid, 16, fg, 1.0) for _ in range(300)])
    assert 2.4 < heavy[draws].sum().item() / (~heavy[draws]).sum().item() < 3.6
    invalid_fg = valid.clone()
    invalid_fg[8:24, 8:24] = False  # foreground with no cached target is never drawn
    assert not is_fg[sample_cells(invalid_fg, 64, fg, 0.9)].any()


def test_instance_infonce_matches_reference():
    student, teacher = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    s = student.numpy() / np.linalg.norm(student.numpy(), axis=1, keepdims=True)
    t = teacher.numpy() / np.linalg.norm(teacher.numpy(), axis=1, keepdims=True)
    expected = _log_softmax_ce(s @ t.T / 0.07)
    assert instance_infonce(student, teacher).item() == pytest.approx(expected, rel=1e-10)
    none = instance_infonce(torch.zeros(0, 6, requires_grad=True), torch.zeros(0, 6))
    assert none.item() == 0 and none.requires_grad


def test_pool_boxes_means_covered_cells():
    fmap = torch.randn(3, 6, 8, dtype=torch.float64)
    boxes = torch.tensor([[1.0, 2.0, 4.0, 3.0],     # cols 1-3, row 2
                          [2.2, 0.5, 3.7, 2.1],     # cols 2-3, rows 0-2 (partial cells count)
                          [5.3, 4.2, 5.4, 4.3],     # inside one cell
                          [-3.0, 4.5, 1.5, 9.0],    # clipped: cols 0-1, rows 4-5
                          [9.0, -2.0, 12.0, -1.0]],  # outside: nearest cell (row 0, col 7)
                         dtype=torch.float64)
    covered = [(range(2, 3), range(1, 4)), (range(0, 3), range(2, 4)), (range(4, 5), range(5, 6)),
               (range(4, 6), range(0, 2)), (range(0, 1), range(7, 8))]
    pooled = pool_boxes(fmap, boxes)
    for n, (rows, cols) in enumerate(covered):
        expected = np.mean([fmap[:, r, c].numpy() for r in rows for c in cols], axis=0)
        np.testing.assert_allclose(pooled[n].numpy(), expected, atol=1e-12)



def test_gather_cells_equals_per_sample_indexing_and_backpropagates_once():
    maps = torch.randn(3, 4, 5, 6, requires_grad=True)
    cells = [torch.tensor([0, 29, 7]), torch.tensor([], dtype=torch.long), torch.tensor([5, 5, 12, 1])]
    gathered = gather_cells(maps, cells)
    for b, index in enumerate(cells):
        assert torch.equal(gathered[b], maps[b].flatten(1)[:, index].T)
    sum(part.sum() for part in gathered).backward()
    expected = torch.zeros(3, 30)
    for b, index in enumerate(cells):
        expected[b].index_add_(0, index, torch.ones(len(index)))  # repeated cells receive their gradient twice
    assert torch.equal(maps.grad.flatten(2), expected[:, None].expand(3, 4, 30))

# ---------------------------------------------------------------- MSE

def test_masked_mse_matches_manual_mean():
    student = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    mask = torch.rand(2, 4, 5) > 0.5
    total, count = 0.0, 0
    for b, r, c in zip(*np.nonzero(mask.numpy())):
        for ch in range(3):
            total += (student[b, ch, r, c].item() - teacher[b, ch, r, c].item()) ** 2
            count += 1
    loss = MaskedMSELoss()(student, teacher, mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-12)
    loss.backward()
    assert (student.grad.permute(0, 2, 3, 1)[~mask] == 0).all()
    assert MaskedMSELoss()(student, teacher).item() == pytest.approx(F.mse_loss(student, teacher).item())


def test_masked_mse_without_valid_cells_is_zero_with_grad():
    student = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = MaskedMSELoss()(student, torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and (student.grad == 0).all()


def test_projection_of_vectors_equals_projection_of_one_cell_maps():
    # (N, C) vectors take a linear path with the 1x1 convolutions' own weights: the same embedding as the
    # map path gives a 1x1 map, so CRD's pooled vectors and InfoNCE's cells share one head
    torch.manual_seed(3)
    head = ProjectionMLP(24, feat_dim=16).double()
    vectors = torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(head(vectors), head(vectors[:, :, None, None])[:, :, 0, 0])
