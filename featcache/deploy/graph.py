"""Graph-friendly equivalents of the exported modules: the checkpoint's weights, the same arithmetic, cheaper ONNX.

The exported graph must compute what mmdet3d computes, but written the way mmdet3d writes it some modules
export to ONNX Runtime badly. Profiling the demo students in ONNX Runtime (1 thread) showed where:

- ``PillarFeatureNet`` (``legacy=False``) fills its voxel-centre offsets by three in-place column writes;
  torch.export turns each into a ``ScatterElements`` over the whole (N, M, 3) tensor, its BatchNorm1d sits
  between two transposes, and every decoration is a per-point broadcast, which ONNX Runtime runs one short
  row at a time. :class:`PillarFeatures` folds the BatchNorm (eval-mode BN is affine) and reorders the
  arithmetic so the per-point work is one GEMM and one max (about 3x faster on the demo scans).
- ``PointPillarsScatter.forward_batch`` selects the sample's pillars with ``NonZero`` + ``GatherND``
  even for batch 1. :class:`CanvasScatter` scatters the (N, C) features as rows of a (H*W, C) canvas
  (one ``ScatterND``), then transposes it.
- CenterHead's ``SeparateHead`` ends every branch (24 in the demo: 4 tasks x 6 outputs) with a 3x3
  convolution to 1-3 channels. ONNX Runtime's NCHWc layout pads a convolution's outputs to its block of
  8/16 channels, so each of these costs as much as a 16-channel one: half the students' convolution
  time. :func:`transposed_final_conv` replaces each by the equal ConvTranspose2d.

Every rewrite is mathematically equal to its module (the same sums of products, regrouped); only float32
rounding differs: within 2e-5 of the pillar features' scale on the real nuScenes scan, and < 3e-5 on
every dense output of the demo models over 30 val scans.
Each equivalent is used only where its precondition holds (:func:`graph_modules`); otherwise the
module itself is exported. ``featcache deploy`` self-checks the result against the mmdet3d modules and
the tests compare them on real scans (< 1e-4).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PillarFeatures(nn.Module):
    """``PillarFeatureNet.forward`` (``legacy=False``) for the graph, its BatchNorm1d folded into the linear layer.

    The common case, one max-pooling ``PFNLayer`` without the distance feature, is reordered: the layer's
    linear map of the decorated point ``[p, p - mean, p - centre]`` is ``W_points p - (W_cluster mean +
    W_centre centre)``, and ``max_j relu(a_j + b) = relu(max_j a_j + b)`` for a per-pillar ``b``. So one
    GEMM over the raw points (channel-first, padding rows pushed to -1e30 so the max sees real points
    only), a max over each pillar's points, then the per-pillar correction; a pillar with padding rows
    also takes their value (the layer's bias after ReLU), as mmdet3d's max over the zeroed rows does.
    This avoids per-point broadcasts, which ONNX Runtime runs one short row at a time. Anything else
    (several layers, ``avg`` mode, the distance feature) decorates each point as mmdet3d does."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.with_cluster_center = bool(encoder._with_cluster_center)
        self.with_voxel_center = bool(encoder._with_voxel_center)
        self.with_distance = bool(encoder._with_distance)
        # voxel centres (_centres) = coors[:, (3, 2, 1)] * size + offset
        self.register_buffer("size", torch.tensor([encoder.vx, encoder.vy, encoder.vz], dtype=torch.float32))
        self.register_buffer("offset", torch.tensor([encoder.x_offset, encoder.y_offset, encoder.z_offset],
                                                    dtype=torch.float32))
        self.layers = nn.ModuleList(_FoldedPFNLayer(layer) for layer in encoder.pfn_layers)
        only = self.layers[0]
        self.reordered = len(self.layers) == 1 and only.mode == "max" and only.last_vfe and not self.with_distance
        if self.reordered:
            weight = only.linear.weight.detach()  # (out, features + 3 * decorations)
            features = weight.shape[1] - 3 * (self.with_cluster_center + self.with_voxel_center)
            points = weight[:, :features].clone()
            column, cluster, centre = features, None, None
            if self.with_cluster_center:
                cluster = weight[:, column:column + 3]
                points[:, :3] += cluster
                column += 3
            if self.with_voxel_center:
                centre = weight[:, column:column + 3]
                points[:, :3] += centre
            zeros = torch.zeros(weight.shape[0], 3)
            self.register_buffer("w_points", points)
            self.register_buffer("w_cluster", cluster.clone() if cluster is not None else zeros)
            self.register_buffer("w_centre", centre.clone() if centre is not None else zeros)
            self.register_buffer("bias", only.linear.bias.detach().view(-1, 1).clone())

    def forward(self, features: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        if self.reordered:
            return self._reordered(features, num_points, coors)
        decorated = [features]
        xyz = features[:, :, :3]
        if self.with_cluster_center:
            mean = xyz.sum(dim=1, keepdim=True) / num_points.to(features.dtype).view(-1, 1, 1)
            decorated.append(xyz - mean)
        if self.with_voxel_center:
            decorated.append(xyz - self._centres(coors, features.dtype).unsqueeze(1))
        if self.with_distance:
            decorated.append(torch.norm(xyz, 2, 2, keepdim=True))
        x = torch.cat(decorated, dim=-1)
        slots = torch.arange(features.shape[1], device=features.device)
        x = x * (slots.view(1, -1) < num_points.view(-1, 1)).unsqueeze(-1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, num_points)
        return x.squeeze(1)

    def _centres(self, coors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, 3) x, y, z centre of each pillar's voxel, as PillarFeatureNet computes them."""
        return coors[:, [3, 2, 1]].to(dtype) * self.size + self.offset

    def _reordered(self, features: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        pillars, slots, channels = features.shape
        dtype = features.dtype
        points = features.reshape(pillars * slots, channels).t()  # (C, N*M)
        correction = self.bias.expand(-1, pillars)  # (out, N)
        if self.with_cluster_center:
            mean = points[:3].reshape(3, pillars, slots).sum(2) / num_points.to(dtype).view(1, -1)
            correction = correction - self.w_cluster @ mean
        if self.with_voxel_center:
            correction = correction - self.w_centre @ self._centres(coors, dtype).t()
        padding = torch.arange(slots, device=features.device).view(1, -1) >= num_points.view(-1, 1)  # (N, M)
        penalty = torch.where(padding, -1e30, 0.0).to(dtype).reshape(1, pillars * slots)
        best = (self.w_points @ points + penalty).reshape(-1, pillars, slots).max(2)[0]  # (out, N), real points
        pooled = torch.relu(best + correction)
        has_padding = (num_points < slots).to(dtype).view(1, -1)
        pooled = torch.maximum(pooled, torch.relu(self.bias) * has_padding)
        return pooled.t()


class _FoldedPFNLayer(nn.Module):
    """``PFNLayer`` in eval mode with its BatchNorm1d folded into the linear layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        weight = layer.linear.weight.detach()
        bias = layer.linear.bias.detach() if layer.linear.bias is not None else torch.zeros(weight.shape[0])
        norm = getattr(layer, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            scale = norm.weight.detach() / torch.sqrt(norm.running_var.detach() + norm.eps)
            weight = weight * scale.view(-1, 1)
            bias = (bias - norm.running_mean.detach()) * scale + norm.bias.detach()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.mode = layer.mode
        self.last_vfe = bool(layer.last_vfe)

    def forward(self, inputs: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.linear(inputs))
        if self.mode == "max":
            pooled = torch.max(x, dim=1, keepdim=True)[0]
        else:
            pooled = x.sum(dim=1, keepdim=True) / num_points.to(inputs.dtype).view(-1, 1, 1)
        if self.last_vfe:
            return pooled
        return torch.cat([x, pooled.repeat(1, inputs.shape[1], 1)], dim=2)


class CanvasScatter(nn.Module):
    """``PointPillarsScatter`` for one sample: pillar features (N, C) to the (1, C, ny, nx) canvas."""

    def __init__(self, scatter: nn.Module) -> None:
        super().__init__()
        self.channels, self.nx, self.ny = int(scatter.in_channels), int(scatter.nx), int(scatter.ny)

    def forward(self, features: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        canvas = features.new_zeros(self.ny * self.nx, self.channels)
        indices = (coors[:, 2] * self.nx + coors[:, 3]).long()
        canvas = canvas.index_put((indices,), features)
        return canvas.t().reshape(1, self.channels, self.ny, self.nx)


def _transposable(conv: Any) -> bool:
    """A final convolution :func:`transposed_final_conv` can replace: a plain Conv2d, odd square kernel,
    stride 1, no dilation or groups, 'same' zero padding (SeparateHead builds exactly this)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.padding_mode == "zeros")


def transposed_final_conv(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """``conv`` (stride 1, 'same' padding) as the equal ConvTranspose2d: weights with in/out swapped and the
    kernel flipped. ONNX Runtime runs a ConvTranspose as one GEMM to k*k*C columns plus col2im, without
    the NCHWc channel padding that makes a 1-3 channel Conv cost as much as a 16-channel one."""
    kernel = conv.kernel_size[0]
    transposed = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, kernel, padding=kernel // 2,
                                    bias=conv.bias is not None)
    with torch.no_grad():
        transposed.weight.copy_(conv.weight.detach().transpose(0, 1).flip(2, 3))
        if conv.bias is not None:
            transposed.bias.copy_(conv.bias.detach())
    return transposed


def with_transposed_final_convs(head: nn.Module) -> nn.Module | None:
    """A copy of a CenterHead whose ``SeparateHead`` branches end in :func:`transposed_final_conv`, or None
    when a branch is not a plain SeparateHead Sequential ending in a convolution it can replace (DCN heads
    and others keep their modules)."""
    import copy

    from mmdet3d.models.dense_heads.centerpoint_head import SeparateHead

    tasks = list(getattr(head, "task_heads", []))
    if not tasks or any(type(task) is not SeparateHead for task in tasks):
        return None
    for task in tasks:
        for name in task.heads:
            branch = getattr(task, name)
            if not isinstance(branch, nn.Sequential) or not _transposable(branch[-1]):
                return None
    copied = copy.deepcopy(head)
    for task in copied.task_heads:
        for name in task.heads:
            branch = getattr(task, name)
            branch[len(branch) - 1] = transposed_final_conv(branch[-1])
    return copied


def graph_modules(detector: nn.Module) -> dict[str, nn.Module]:
    """The equivalents that apply to ``detector`` (keys ``voxel_encoder``, ``middle_encoder``, ``head``, the
    last a copy of the CenterHead), each only where its precondition holds: a legacy PillarFeatureNet (which
    overwrites its own input columns) keeps its module, so does a head :func:`with_transposed_final_convs`
    refuses."""
    modules: dict[str, nn.Module] = {}
    encoder = detector.pts_voxel_encoder
    if not encoder.legacy and not getattr(encoder, "fp16_enabled", False):
        modules["voxel_encoder"] = PillarFeatures(encoder)
    modules["middle_encoder"] = CanvasScatter(detector.pts_middle_encoder)
    head = with_transposed_final_convs(detector.pts_bbox_head)
    if head is not None:
        modules["head"] = head
    return modules


__all__ = ["PillarFeatures", "CanvasScatter", "transposed_final_conv", "with_transposed_final_convs",
           "graph_modules"]
