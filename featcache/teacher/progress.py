"""The build's progress bar: samples/s and ETA (tqdm's own), MB/s written and bytes/sample (the writer's)."""
from __future__ import annotations

import time

from featcache.writer import CacheWriter


class BuildProgress:
    """One build's bar over ``total`` samples; nothing shown unless ``enabled`` (--progress, rank 0)."""

    def __init__(self, total: int, writer: CacheWriter, enabled: bool, rank_note: str = "") -> None:
        self.writer = writer
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc=f"featcache build{rank_note}", dynamic_ncols=True)

    def update(self, count: int) -> None:
        if self.bar is None:
            return
        stats = self.writer.stats
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if stats.samples:
            self.bar.set_postfix_str(f"{stats.stored_bytes / elapsed / 1e6:.1f} MB/s written, "
                                     f"{stats.stored_bytes / stats.samples / 1e6:.2f} MB/sample "
                                     f"({stats.raw_bytes / max(stats.stored_bytes, 1):.1f}x smaller than fp32)",
                                     refresh=False)
        self.bar.update(count)

    def close(self, done: int | None = None) -> None:
        """Close the bar, showing ``done`` samples if given: a write that failed is not shown as done."""
        if self.bar is not None:
            if done is not None and done != self.bar.n:
                self.bar.n = done
                self.bar.set_description_str(f"{self.bar.desc} (stopped)", refresh=False)
                self.bar.refresh()
            self.bar.close()
