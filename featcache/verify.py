"""``featcache verify``: check every sample of a cache is present and matches its checksum."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featcache import format
from featcache.errors import CorruptSampleError
from featcache.reader import open_cache


@dataclass
class VerifyReport:
    location: str
    total: int
    complete: int = 0
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    bad_rows: list[int] = field(default_factory=list)  # missing + corrupt: what --repair rebuilds

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
        return "\n".join(lines)


def verify_cache(location: str, storage_options: dict[str, Any] | None = None, progress: bool = False) -> VerifyReport:
    """Decode every complete sample and compare its chunks' and values' checksums with what the build
    recorded; list what is missing or bad."""
    cache = open_cache(location, storage_options=storage_options, verify=True, check_values=True)
    status = cache.status()
    report = VerifyReport(location=location, total=len(cache))
    rows = range(len(cache))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, unit="sample", desc="featcache verify")
    for row in rows:
        key = cache.row_keys[row]
        if status[row] == format.STATUS_MISSING:
            report.missing.append(key)
            report.bad_rows.append(row)
            continue
        if status[row] == format.STATUS_INVALID:
            report.invalid.append(key)
            continue
        try:
            cache.read_row(row, decode=False)
            report.complete += 1
        except CorruptSampleError as exc:
            report.corrupt.append((key, str(exc)))
            report.bad_rows.append(row)
    return report
