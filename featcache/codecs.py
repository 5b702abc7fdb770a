"""How one cached feature map is turned into stored values and back.

A codec is named ``<precision>-<compressor>`` (``fp16-zstd1``, ``int8-lz4``, ``fp32-none``):

- precision ``fp32`` (bit-exact), ``fp16``, ``bf16`` (float32 with its mantissa rounded to bf16's 7
  bits by numcodecs' BitRound: bf16's precision, while any zarr reader can decode the float32
  values; the zeroed mantissa bits are what the compressor then removes) or ``int8``
  (uint8 with a per-sample, per-channel affine scale: BEV channels differ in range by orders of
  magnitude, one global scale loses the small ones);
- precision ``score8``, for class-heatmap logits only: uint8 of the sigmoid score, round(255 * sigmoid(x)),
  decoded back to the logit of q / 255, where the end codes 0 and 255 stand for 1e-4 and 1 - 1e-4
  (CenterHead's own score clamp; most of a trained heatmap is background far below 1/510, and a
  bin-centre decode would lift all of it to 0.002, weighting background cells ~6x more in
  confidence-weighted heatmap KD). Every score is kept within 1/510 (absolute), which is what
  heatmap distillation compares (sigmoid scores, squared or absolute differences); an int8 affine
  grid over a logit range is at the mercy of one outlier channel value, and float16 logits cost
  ~1.6 bytes a value even compressed. Not affine, so a linear read of the stored values does not
  equal the read of the decoded map (``CodecSpec.linear``);
- precision ``asin8``, for class-heatmap logits only: uint8 of the sigmoid score on its arcsine-root grid,
  q = round(510 / pi * asin(sqrt(s))), decoded to the logit of sin^2(q * pi / 510) (end codes clamped
  like score8's). The grid is finest where scores are near 0 and 1 and never coarser than 0.0031 (at
  0.5): a score of 0.001 keeps ~12% relative precision where score8 stores every score below 1/510 as
  one code, 0.01 ~4% where score8 has 20%. Heatmap KD weights each cell by the teacher's score, and much
  of that weight sits on low-score cells (the demo teacher: ~35% of it below 0.05);
  there score8's grid biases the targets and their weights. Costs about twice score8's bytes (the
  background is no longer a run of one code), a third of fp16's. Not affine either;
- compressor ``zstd<level>`` (default level 1), ``lz4`` (blosc-lz4 with byte shuffle) or ``none``.

The precision step (:func:`encode` / :func:`decode`) is done by featcache in numpy, so its
result can be checksummed; the compressor is a zarr codec, applied by zarr per chunk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from featcache.errors import ConfigError
from featcache.selectors import parse_layer_items, selects

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "score8", "asin8")
#: precisions that store sigmoid scores of class-heatmap logits (``CodecSpec.stores_scores``)
SCORE_PRECISIONS = ("score8", "asin8")
COMPRESSORS = ("zstd", "lz4", "none")
BF16_KEEPBITS = 7
#: the scores score8's and asin8's end codes decode to: 1e-4 and 1 - 1e-4 (logits -/+9.21), CenterHead's
#: score clamp
SCORE8_FLOOR = 1e-4
_CODEC_RE = re.compile(r"^(?P<precision>[a-z0-9]+)-(?P<compressor>zstd|lz4|none|[a-z]+)(?P<level>-?\d+)?$")


@dataclass(frozen=True)
class CodecSpec:
    """A validated codec choice for one cached layer."""

    precision: str = "fp16"
    compressor: str = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.compressor not in COMPRESSORS:
            raise ConfigError(f"unknown compressor {self.compressor!r}; choose one of {', '.join(COMPRESSORS)}")
        if self.compressor == "zstd" and not -7 <= self.level <= 22:
            raise ConfigError(f"zstd level must be in -7..22, got {self.level}")

    @property
    def name(self) -> str:
        suffix = f"zstd{self.level}" if self.compressor == "zstd" else self.compressor
        return f"{self.precision}-{suffix}"

    @property
    def has_qparams(self) -> bool:
        """Whether each stored sample carries per-channel (scale, offset) beside its codes (``int8``): its
        layer then owns a second array (``LayerSpec.arrays``), read and written with the codes."""
        return self.precision == "int8"

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype({"fp32": np.float32, "fp16": np.float16, "bf16": np.float32, "int8": np.uint8,
                         "score8": np.uint8, "asin8": np.uint8}[self.precision])

    @property
    def stores_scores(self) -> bool:
        """Whether the stored values are sigmoid scores (``score8``, ``asin8``): for class heatmaps only."""
        return self.precision in SCORE_PRECISIONS

    @property
    def linear(self) -> bool:
        """Whether decoding is affine per channel, so that a linear read of the stored values (bilinear
        interpolation, a weighted pool), decoded afterwards, equals the same read of the decoded map
        (``affine_tensors``). False for the score codecs: decode the values read first."""
        return not self.stores_scores

    @property
    def lossless(self) -> bool:
        return self.precision == "fp32"

    def zarr_codecs(self) -> dict[str, Any]:
        """Keyword arguments for ``zarr.create_array``: this codec's compressor, then a crc32c of
        the compressed chunk (``checksummed``)."""
        import zarr.codecs

        if self.compressor == "zstd":
            compressors: list[Any] = [zarr.codecs.ZstdCodec(level=self.level)]
        elif self.compressor == "lz4":
            compressors = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle",
                                                  typesize=self.storage_dtype.itemsize)]
        else:
            compressors = []
        return {"compressors": checksummed(compressors)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "compressor": self.compressor, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CodecSpec":
        return cls(precision=data["precision"], compressor=data["compressor"], level=int(data["level"]))


# int8 per channel + zstd3: on BEVFusion-lidar (voxel0075) features it is the codec that meets the
# storage target (<= 1/6 of fp32 at mean cosine >= 0.999; see BENCHMARKS.md's storage figure, where
# fp16-zstd1 falls just short), and it decodes cheapest (uint8 * scale + offset). Pass fp16-zstd1 or
# fp32-none for closer targets.
DEFAULT_CODEC = CodecSpec(precision="int8", compressor="zstd", level=3)


def checksummed(compressors: list[Any] | None = None) -> list[Any]:
    """Zarr compressors ending with zarr's crc32c codec: each stored chunk carries the crc32c of its
    compressed bytes, which a read checks for a fraction of the cost of summing the decompressed
    values (the compression ratio: BENCHMARKS.md, storage figure)."""
    import zarr.codecs

    return [*(compressors or []), zarr.codecs.Crc32cCodec()]


def has_chunk_checksum(metadata: Any) -> bool:
    """True when a zarr array's chunks end with zarr's crc32c of their bytes (``checksummed``)."""
    import zarr.codecs

    codecs_ = list(getattr(metadata, "codecs", ()))
    return bool(codecs_) and isinstance(codecs_[-1], zarr.codecs.Crc32cCodec)


def parse_codec(text: str) -> CodecSpec:
    """Parse ``fp16-zstd1`` style names; the error lists what is valid."""
    match = _CODEC_RE.match(text.strip().lower())
    if not match:
        raise ConfigError(
            f"codec {text!r} is not of the form <precision>-<compressor>, e.g. fp16-zstd1, int8-lz4, fp32-none "
            f"(precisions: {', '.join(PRECISIONS)}; compressors: zstd<level>, lz4, none)")
    level = match["level"]
    if level is not None and match["compressor"] != "zstd":
        raise ConfigError(f"codec {text!r}: only zstd takes a level")
    try:
        return CodecSpec(match["precision"], match["compressor"], int(level) if level is not None else 1)
    except ConfigError as exc:
        raise ConfigError(f"codec {text!r}: {exc}") from None


@dataclass(frozen=True)
class CodecOption:
    """``--codec`` parsed (:meth:`parse`): one codec for every layer (``every``), or per layer
    ``(selector, codec)`` items in the order given, a later item winning where two name one layer. A selector is
    a layer, a module a layer is an output or a part of (:func:`selects`), or a head output kind (``heatmap``)."""

    every: CodecSpec | None = None
    items: tuple[tuple[str, CodecSpec], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "CodecOption":
        """Parse ``--codec``, the one parser of its syntax: one codec for all layers (``fp16-zstd1``) or per layer
        (``pts_neck=int8-zstd3,pts_backbone=fp16-lz4``, or a head output kind: ``heatmap=fp16-zstd1``); nothing
        (None, "") leaves every layer its default. Which layers the selectors name is checked against the build's
        options (``featcache.teacher.options.check_codec_option``) and the recorded layers (:meth:`choose`)."""
        every, items = parse_layer_items(text, "--codec", "CODEC", ("pts_neck=int8-zstd3", "fp16-zstd1"))
        if every is not None:
            return cls(every=parse_codec(every))
        return cls(items=tuple((selector, parse_codec(value)) for selector, value in items))

    def choose(self, layer_names: Sequence[str], defaults: dict[str, CodecSpec] | None = None,
               kinds: dict[str, str] | None = None) -> dict[str, CodecSpec]:
        """Each of ``layer_names``' codec: this option's, else ``defaults``' entry, else :data:`DEFAULT_CODEC`.
        ``kinds`` (layer -> head output kind) lets a kind select that output of every task. A selector that
        names none of the layers is refused, listing them."""
        if self.every is not None:
            return {name: self.every for name in layer_names}
        chosen = {name: (defaults or {}).get(name, DEFAULT_CODEC) for name in layer_names}
        for selector, codec in self.items:
            matches = [name for name in layer_names if selects(selector, name) or (kinds or {}).get(name) == selector]
            if not matches:
                named_kinds = sorted(set((kinds or {}).values()))
                raise ConfigError(f"--codec names layer {selector!r}, which is not recorded; recorded: "
                                  f"{', '.join(layer_names)}"
                                  + (f" (or a head output kind: {', '.join(named_kinds)})" if named_kinds else ""))
            for name in matches:
                chosen[name] = codec
        return chosen


_ENCODE_CHANNELS = 16
#: asin8 codes per quarter turn: q = 255 stands for the angle pi / 2 (score 1)
_ASIN8_STEPS = 510


def encode(features: np.ndarray, codec: CodecSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn a float32 ``(C, H, W)`` map into the stored values, plus int8's ``(2, C)`` scale/offset."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if codec.precision == "fp32":
        return features, None
    if codec.precision == "bf16":
        from numcodecs import BitRound

        return BitRound(keepbits=BF16_KEEPBITS).encode(features).view(np.float32).reshape(features.shape), None
    if codec.precision == "fp16":
        return features.astype(np.float16), None
    if codec.precision == "score8":
        # sigmoid as 0.5 * (1 + tanh(x / 2)): no overflow for logits of any size
        scores = np.tanh(features * np.float32(0.5))
        scores += 1
        scores *= np.float32(127.5)
        np.rint(scores, out=scores)
        return scores.astype(np.uint8), None
    if codec.precision == "asin8":
        # asin(sqrt(sigmoid(x))) = atan(exp(x / 2)); exp overflowing to inf is atan's pi / 2
        with np.errstate(over="ignore"):
            angles = np.arctan(np.exp(features * np.float32(0.5)))
        angles *= np.float32(_ASIN8_STEPS / np.pi)
        np.rint(angles, out=angles)
        return angles.astype(np.uint8), None
    per_channel = features.reshape(features.shape[0], -1)
    low = per_channel.min(axis=1)
    high = per_channel.max(axis=1)
    scale = (high - low) / 255.0
    scale[scale == 0] = 1.0
    stored = np.empty(per_channel.shape, np.uint8)
    # a few channels at a time, in place: the same float32 arithmetic as whole-map expressions, without
    # four map-sized temporaries (a 512x180x180 map is 66 MB: each one page-faults fresh memory, and
    # the build encodes in a thread beside the teacher's forward)
    for start in range(0, per_channel.shape[0], _ENCODE_CHANNELS):
        block = slice(start, start + _ENCODE_CHANNELS)
        values = np.subtract(per_channel[block], low[block, None])
        values /= scale[block, None]
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        stored[block] = values
    return stored.reshape(features.shape), np.stack([scale, low]).astype(np.float32)


def decode(stored: np.ndarray, codec: CodecSpec, qparams: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`encode`: float32 features from stored values (and int8's scale/offset)."""
    if codec.stores_scores:
        if codec.precision == "score8":
            scores = stored.astype(np.float32) / np.float32(255)
        else:
            scores = np.square(np.sin(stored.astype(np.float32) * np.float32(np.pi / _ASIN8_STEPS)))
        scores = np.clip(scores, np.float32(SCORE8_FLOOR), np.float32(1 - SCORE8_FLOOR))
        return np.log(scores / (1 - scores)).astype(np.float32, copy=False)
    if not codec.has_qparams:
        return stored.astype(np.float32, copy=False)
    if qparams is None:
        raise ValueError("int8 features need their per-channel scale/offset to decode")
    shape = (-1,) + (1,) * (stored.ndim - 1)
    return stored.astype(np.float32) * qparams[0].reshape(shape) + qparams[1].reshape(shape)


def decode_tensor(stored: "torch.Tensor", codec: CodecSpec, qparams: "torch.Tensor | None" = None,
                  dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """:func:`decode` in torch, on whatever device ``stored`` is on, batched or not.

    ``stored`` is ``(..., C, H, W)`` as read (float16, uint8...), ``qparams`` int8's ``(..., 2, C)``.
    Readers that hand out stored values let the training step decode on the accelerator, where the
    float16/uint8 -> float32 conversion is nearly free; on the CPU it costs more than the zstd
    decompression itself (../shared/STORAGE-FACTS.md), and stored values are 2-4x fewer bytes to
    pass from DataLoader workers.
    """
    import torch

    dtype = dtype or torch.float32
    if codec.stores_scores:
        if codec.precision == "score8":
            scores = stored.to(torch.float32) / 255
        else:
            scores = torch.sin(stored.to(torch.float32) * (torch.pi / _ASIN8_STEPS)).square()
        return torch.logit(scores.clamp(SCORE8_FLOOR, 1 - SCORE8_FLOOR)).to(dtype)
    affine = affine_tensors(codec, qparams, dtype)
    if affine is None:
        return stored.to(dtype)
    scale, offset = affine
    trailing = (1,) * (stored.ndim - scale.ndim)
    return stored.to(dtype) * scale.reshape(scale.shape + trailing) + offset.reshape(offset.shape + trailing)


def affine_tensors(codec: CodecSpec, qparams: "torch.Tensor | None", dtype: "torch.dtype | None" = None
                   ) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """The per-channel affine that decodes stored values (features = scale * stored + offset), as
    ``(scale, offset)``, each ``(..., C)``; None for codecs whose stored values are the features.

    Decoding is affine per channel, so any linear read of a map (bilinear interpolation, a weighted
    pool) can run on the stored values and be decoded afterwards: scale * read + offset * sum(weights).
    """
    import torch

    if not codec.linear:
        raise ValueError(f"codec {codec.name} does not decode by an affine map; decode the values read "
                         "(codecs.decode_tensor) before any linear read")
    if not codec.has_qparams:
        return None
    if qparams is None:
        raise ValueError("int8 features need their per-channel scale/offset to decode")
    scale, offset = qparams.to(dtype or torch.float32).unbind(-2)
    return scale, offset
