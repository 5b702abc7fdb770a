"""One writer per cache: an advisory lock on ``<cache>/featcache.lock``.

``featcache build`` (``--force`` and ``verify --repair`` included) takes it before it creates, erases or
writes anything of the cache and holds it to the end of the run; a second writer is refused at once,
naming the cache and the holder (pid, host, command, since when), and touches nothing. The lock is
``fcntl.flock`` on the lock file: the kernel drops it when the holder exits, ``kill -9`` included, so a
stale lock cannot outlive its process. Processes forked by the holder (DataLoader workers) close their
copy at fork, so an orphaned worker never keeps the lock of a killed build. The file stays in the cache
after the run, empty (deleting a lock file races with the next taker); it is not part of the cache's data.

Under torchrun, rank 0 takes the lock for the job and tells the other ranks whether it got it
(``featcache.world``), so one job is one writer. URL caches (fsspec: s3, gcs, memory...) have no lock:
an object store offers nothing a lock could be built on, so there one writer per cache is the user's
to keep (FORMAT.md); the build says so in a warning.

Light on purpose (no zarr, no torch), like ``featcache.location``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

from featcache.errors import CacheBusyError, FeatcacheError
from featcache.location import LOCK, is_url

logger = logging.getLogger("featcache.lock")

_HELD: dict[int, str] = {}  # fd -> cache, of the locks this process holds (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(path: str, wait: float = 1.0) -> str:
    """Who holds the lock, from what the holder writes into the lock file right after taking it (waiting up
    to ``wait`` seconds for that note)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.loads(handle.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if (isinstance(info, dict) and "pid" in info) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not isinstance(info, dict) or "pid" not in info:
        return "another featcache process (it has not written its name yet)"
    return (f"{info.get('command', 'featcache')} (pid {info['pid']} on {info.get('host', '?')}, since "
            f"{info.get('since', '?')})")


class CacheLock:
    """The lock on one cache; ``release`` (or leaving the ``with`` block) gives it back. ``fd`` is None for a
    lock that holds nothing: a URL cache, or a torchrun rank other than 0 (rank 0 holds it for the job).
    ``created``: the lock file and the directories this lock created, which ``release(discard=True)``
    removes again while they hold nothing else (a run that failed before writing anything leaves no trace)."""

    def __init__(self, location: str, fd: int | None, created: tuple[str, ...] = ()) -> None:
        self.location, self.fd, self.created = location, fd, created

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self, discard: bool = False) -> None:
        """Give the lock back; with ``discard``, first remove what ``acquire`` created (the lock file, then
        directories, innermost first) where nothing else was written beside it."""
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        _HELD.pop(fd, None)
        try:
            if discard:
                for path in self.created:  # the lock file first: unlinked while still held, so no one took it
                    try:
                        os.unlink(path) if path.endswith(LOCK) else os.rmdir(path)
                    except OSError:  # something else is there now: it stays, and so do its parents
                        break
            try:  # the holder's note is there only while a writer holds the lock: at rest the file is empty,
                os.ftruncate(fd, 0)  # so a run refused after taking it (other teacher...) leaves it as it was
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _missing_directories(root: str) -> list[str]:
    """``root`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not os.path.lexists(root):
        missing.append(root)
        parent = os.path.dirname(root)
        if parent == root:
            break
        root = parent
    return missing


def _open_lock_file(path: str) -> tuple[int, bool]:
    """The lock file opened read-write, and whether this call created it."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # removed in between by a run that failed before writing anything: again
            continue


def acquire(location: str | os.PathLike, command: str = "featcache build") -> CacheLock:
    """Take ``location``'s writer lock without waiting, creating the directory if it does not exist yet (two
    builds racing to create one new cache meet at the lock, before either writes anything else).

    Raises CacheBusyError naming the cache and the holder if another process holds it, FeatcacheError if the
    lock file cannot be created (``--out`` not writable). URL caches: returns a lock holding nothing."""
    where = os.fspath(location)
    if is_url(where):
        logger.warning("%s is an object store: featcache cannot lock it, so nothing stops a second build, --force "
                       "or verify --repair from writing it at the same time; run one writer at a time there "
                       "(FORMAT.md, one writer per cache)", where)
        return CacheLock(where, None)
    import fcntl

    root = os.path.abspath(where)
    path = os.path.join(root, LOCK)
    while True:
        directories = _missing_directories(root)
        try:
            os.makedirs(root, exist_ok=True)
            fd, created = _open_lock_file(path)
        except OSError as exc:
            raise FeatcacheError(f"--out {where}: cannot create the cache there ({type(exc).__name__}: {exc}); choose "
                                 "a directory you can write, or fix its permissions") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise CacheBusyError(f"{where} is being written by {_holder(path)}: one writer per cache, and nothing was "
                                 "touched. Wait for it to finish (or stop it), then run this again") from exc
        except OSError as exc:  # e.g. a filesystem without flock
            os.close(fd)
            raise FeatcacheError(f"--out {where}: cannot lock {path} ({type(exc).__name__}: {exc}); build on a local "
                                 "filesystem that supports flock") from exc
        try:  # still the file at that path? (one that failed before writing anything removes its own)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _HELD[fd] = root
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:][:12]}
    try:  # for the refusal message of the next one only: the lock itself is the flock
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass
    return CacheLock(where, fd, created=((path,) if created else ()) + tuple(directories))


def acquire_for_world(location: str | os.PathLike, world: Any, command: str = "featcache build") -> CacheLock:
    """``acquire`` by rank 0 for a torchrun job; every rank gets rank 0's answer, so all fail or none does
    (the other ranks hold a lock of nothing). A single process just acquires."""
    if world.size <= 1:
        return acquire(location, command)
    import torch.distributed as dist

    lock, message = CacheLock(os.fspath(location), None), [None]
    if world.is_main:
        try:
            lock = acquire(location, command)
        except FeatcacheError as exc:
            message = [f"{type(exc).__name__}\0{exc}"]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        kind, _, text = message[0].partition("\0")
        raise (CacheBusyError if kind == CacheBusyError.__name__ else FeatcacheError)(text)
    return lock
