"""``featcache verify``: check every sample of a cache is present and matches its checksum."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featcache import format
from featcache.errors import CorruptSampleError
from featcache.inspection import check_nonzero, nearly_zero_layers, spread_rows, zero_layer_warning
from featcache.reader import open_cache

NONZERO_SAMPLES = 16  # complete samples, spread over the cache, whose values verify checks for all-zero layers


@dataclass
class VerifyReport:
    location: str
    total: int
    complete: int = 0
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    bad_rows: list[int] = field(default_factory=list)  # missing + corrupt: what --repair rebuilds
    nonzero_checked: int = 0  # complete samples whose non-zero fractions were looked at
    nearly_zero: dict[str, float] = field(default_factory=dict)  # layer -> largest non-zero fraction seen

    @property
    def ok(self) -> bool:
        return not (self.missing or self.invalid or self.corrupt)

    def summary(self) -> str:
        lines = [f"{self.location}: {self.complete}/{self.total} samples verified"]
        if self.missing:
            lines.append(f"{len(self.missing)} missing (not built yet): {', '.join(self.missing[:20])}"
                         f"{' ...' if len(self.missing) > 20 else ''}")
        if self.invalid:
            lines.append(f"{len(self.invalid)} invalid (non-finite teacher output): {', '.join(self.invalid)}")
        for key, reason in self.corrupt:
            lines.append(f"corrupt {key}: {reason}")
        for name, largest in self.nearly_zero.items():
            lines.append(zero_layer_warning(name, largest, self.nonzero_checked))
        return "\n".join(lines)


def verify_cache(location: str, storage_options: dict[str, Any] | None = None, progress: bool = False) -> VerifyReport:
    """Decode every complete sample and compare its chunks' and values' checksums with what the build
    recorded; list what is missing or bad. A layer (nearly) all zeros in every one of up to
    ``NONZERO_SAMPLES`` complete samples spread over the cache is flagged (``nearly_zero``): the storage
    is intact, but the teacher produced nothing there."""
    cache = open_cache(location, storage_options=storage_options, verify=True, check_values=True)
    status = cache.status()
    report = VerifyReport(location=location, total=len(cache))
    rows = range(len(cache))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, unit="sample", desc="featcache verify")
    looked_at = set(spread_rows([row for row in range(len(cache)) if status[row] == format.STATUS_COMPLETE],
                                NONZERO_SAMPLES))
    fractions: dict[str, list[float]] = {}
    for row in rows:
        key = cache.row_keys[row]
        if status[row] == format.STATUS_MISSING:
            report.missing.append(key)
            report.bad_rows.append(row)
            continue
        if status[row] == format.STATUS_INVALID:
            report.invalid.append(key)
            continue
        if status[row] == format.STATUS_DAMAGED:
            report.corrupt.append((key, f"row {row}: its records row is damaged (cut short, fails its crc32c, or "
                                        "holds no status featcache writes); --repair rebuilds the sample"))
            report.bad_rows.append(row)
            continue
        try:
            if row in looked_at:
                for name, values in check_nonzero(cache, [row]).items():
                    fractions.setdefault(name, []).extend(values)
                report.nonzero_checked += 1
            else:
                cache.read_row(row, decode=False)
            if cache.manifest.boxes is not None:
                cache.read_boxes(row)
            report.complete += 1
        except CorruptSampleError as exc:
            report.corrupt.append((key, str(exc)))
            report.bad_rows.append(row)
    report.nearly_zero = nearly_zero_layers(fractions)
    return report
