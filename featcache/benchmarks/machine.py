"""Facts about the machine a measurement ran on, and the page cache it can drop: what the benchmark reports
(``tools/bench.py``, ``tools/deploy_report.py``) state beside their figures."""
from __future__ import annotations

import os
import platform
import resource
from pathlib import Path




def drop_page_cache() -> str | None:
    """Empty the kernel page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``); the reason on failure."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def cpu_model() -> str:
    """CPU model name(s) from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return f"{names[0]} x{len(names)}" if names else platform.processor() or "unknown"


def memory_total_gib() -> float:
    """MemTotal of /proc/meminfo, GiB."""
    with open("/proc/meminfo") as handle:
        kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
    return kib / 2**20


def shmem_huge_pages() -> str:
    """The kernel's transparent-huge-page policy for shared memory (tmpfs), e.g. 'never'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that over
    from the parent across fork + exec, so every worker would report the report process's peak."""
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
