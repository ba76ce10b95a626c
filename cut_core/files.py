"""Files that are whole or absent, and one run per run folder.

    write_atomic(path, write)         any file (Parquet, text): written aside, fsynced, renamed into place
    write_text_atomic / write_json_atomic   the same for a text or a JSON record (markers, results)
    build_dir(out)                    a folder (a model) built aside and renamed into place when whole
    run_lock(folder, what)            the lock a pipeline run holds on its run folder

Why: "done" is read from the presence of a file (a COMPLETE marker, a model's config.json). A
plain write that a crash cuts short leaves an empty or half-written marker, and a model saved
straight into its folder has config.json long before its weights: a reader would take either as
finished. A rename within one filesystem is atomic, so a reader sees the old state or the new
one, never half of it.

Two runs of one declaration share a run folder: one could delete the other's checkpoint
mid-save. `run_lock` makes the second refuse with the holder's pid and host; a lock whose
process is dead on this host is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from cut_core.errors import UserError

LOCK = "LOCK"


# ---------------------------------------------------------------- atomic files and folders

def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Produce `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which is
    fsynced and renamed into place. The one atomic-write helper (texts, JSON, Parquet files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader sees the old content or all of the new one."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """`data` as JSON (sorted keys; values JSON cannot hold written with str), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True, default=str))


@contextlib.contextmanager
def build_dir(out: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block finishes, rename it to `out`.

    On an exception the temporary folder is deleted and `out` is untouched. An existing empty
    `out` is replaced; a non-empty one is replaced when `replace` (moved aside, the new folder
    renamed in, the old one deleted: a reader finds the old folder or the new one, or for an
    instant none, never a mix), else FileExistsError.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not replace and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is an ordinary one
    try:
        yield tmp
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


def publish_dir(tmp: str | Path, out: str | Path) -> Path:
    """Rename the finished folder `tmp` to `out`, replacing what is there (see `build_dir`)."""
    tmp, out = Path(tmp), Path(out)
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty folder
        return out
    except OSError:
        if not out.exists():
            raise
    aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, aside)
    os.rename(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)
    return out


# ---------------------------------------------------------------- the run lock

class RunLocked(UserError, RuntimeError):
    """Another live process holds this run folder's lock (one line: who, and what to do)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: never written by run_lock (it links a whole file in place)


def lock_holder(folder: str | Path) -> dict | None:
    """Who holds the folder's lock ({'pid', 'host', 'started', 'what'}), or None when nobody does."""
    return _read(Path(folder) / LOCK)


def _stale(holder: dict) -> bool:
    """A lock is stale when its process is dead on this host; a lock from another host is never
    taken over automatically (its pid means nothing here)."""
    return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and not _alive(holder["pid"]))


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "this run") -> Iterator[dict]:
    """Hold `folder/LOCK` for the duration of the block; refuse (RunLocked) when a live process holds it.

    The lock file names the holder (pid, host, start time). It is created whole with a hard link
    (atomic, and it fails when the file exists), so no reader sees a half-written lock. A stale
    lock (dead pid on this host) is taken over with a warning in the returned record.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
    tmp = folder / f".{LOCK}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(me))
    taken_over = None
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                holder = _read(lock)
                if holder is None:
                    continue  # released in between: try again
                if not _stale(holder):
                    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                           if holder else "an unreadable lock")
                    raise RunLocked(
                        f"{what} is already running: {folder} is locked by {who}. Wait for that run to "
                        f"finish; if its process is gone (e.g. on another machine), delete {lock}") from None
                # Move the stale lock aside; only one contender can move this very file.
                aside = folder / f".{LOCK}.stale.{uuid.uuid4().hex[:8]}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(lock, aside)
                    if _read(aside) != holder:  # raced: we moved a fresh lock; put it back
                        os.rename(aside, lock)
                        continue
                    aside.unlink()
                    taken_over = holder
        else:
            raise RunLocked(f"{what}: could not take the lock {lock} (contended); try again")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield {**me, "taken_over": taken_over}
    finally:
        if _read(lock) == me:
            lock.unlink(missing_ok=True)
