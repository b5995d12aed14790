"""One writer at a time per run folder: an advisory lock file naming the process that holds it."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from dreamood.errors import RunFolderLockedError

__all__ = ["LOCK_NAME", "RunFolderLock"]

logger = logging.getLogger("dreamood.pipeline")

#: Name of the lock file inside a run folder.
LOCK_NAME = ".dreamood.lock"


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


class RunFolderLock:
    """An advisory lock on a run folder, held while a process writes its artefacts.

    The lock is the file ``<folder>/.dreamood.lock``, created exclusively and holding the host, process id,
    command and start time of its holder. A second process gets a :class:`~dreamood.errors.RunFolderLockedError`
    naming the holder. A lock left by a process that no longer runs on this host (killed with ``SIGKILL``, a
    crashed machine) is stale: it is reported and taken over. A lock held from another host cannot be checked
    and is never taken over. The lock is re-entrant within a process: every :class:`RunFolderLock` of the same
    folder in one process shares one count of :meth:`acquire` calls, and the last :meth:`release` removes the file.

    Args:
        folder: The run folder (created when missing).
    """

    # Locks this process holds, by lock file: [token, number of acquire calls not yet released].
    _held: dict[Path, list[Any]] = {}  # noqa: RUF012 - shared on purpose, by every instance of the process

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._key = self.path.expanduser().resolve()
        self._acquired = 0  # this object's acquire calls not yet released

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._key in self._held

    def holder(self) -> dict[str, object] | None:
        """What the lock file says of its holder, or ``None`` when there is no lock file.

        Returns:
            The holder's ``host``, ``pid``, ``command`` and ``since`` (an unreadable file gives ``{}``).
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        """Take the lock (again, if this object holds it already).

        Raises:
            RunFolderLockedError: Another running process, or a process on another host, holds it.
        """
        if self._key in self._held:
            self._held[self._key][1] += 1
            self._acquired += 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": token,
        }
        for _ in range(3):  # a stale lock is removed, then the creation is tried again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(record, handle)
            self._held[self._key] = [token, 1]
            self._acquired += 1
            return
        raise RunFolderLockedError(f"could not take the lock {self.path}: it keeps reappearing")

    def _handle_existing(self) -> None:
        """Remove a stale lock, or raise naming the live holder."""
        holder = self.holder()
        if holder is None:
            return  # released meanwhile
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_is_running(pid):
            logger.warning(
                "removed the stale lock %s of process %d (%s, since %s), which no longer runs",
                self.path,
                pid,
                holder.get("command", "?"),
                holder.get("since", "?"),
            )
            self.path.unlink(missing_ok=True)
            return
        if not holder:
            raise RunFolderLockedError(
                f"{self.folder} is locked by {self.path}, which cannot be read; if no dreamood process uses this "
                "folder, delete that file"
            )
        where = "on this machine" if host == socket.gethostname() else f"on host {host}"
        raise RunFolderLockedError(
            f"{self.folder} is in use by process {pid} {where} ({holder.get('command', '?')}, since "
            f"{holder.get('since', '?')}): wait for it to finish or use another output folder; if that process is "
            f"gone, delete {self.path}"
        )

    def release(self) -> None:
        """Release one :meth:`acquire` of this object; the process's last release deletes the file if it is ours."""
        if self._acquired == 0 or self._key not in self._held:
            return
        self._acquired -= 1
        entry = self._held[self._key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[self._key]
        holder = self.holder()
        if holder is not None and holder.get("token") == entry[0]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
