"""A lease on a run's output: one run writes to an output at a time.

``<output>/lease.json`` holds ``{owner, host, pid, acquired_at, expires_at}`` (epoch
seconds). A run takes the lease before it prepares the output, a heartbeat thread renews it
every ``ttl_s / 4`` seconds while the run works, and the run releases it (deletes the file)
when it ends, whatever the outcome. A second run is refused with :class:`OutputBusyError`
(exit 2) while the lease is live. A crashed run's lease lapses:

- at ``expires_at`` (``ttl_s`` after the last heartbeat, default 120 s), or at once
- when the holder ran on this host and its process no longer exists.

Creating the lease is atomic where the store allows it: a hard link that fails if the file
exists on local disks, an S3 conditional PUT (``If-None-Match: *``, s3fs ``mode="create"``) on
object stores. After the create, the lease is read back and must name us.

On local disks the whole acquisition (read, taking over a lapsed lease, create) runs under an
exclusive ``flock`` of ``<output>/lease.lock`` (an empty file that stays), so two runs never act
on the same reading and no settle delay is needed. On object stores, and on a local filesystem
without ``flock``, taking over a lapsed lease deletes it and creates it again; two runs that take
over the same lapsed lease at the same instant can both delete and only one create succeeds,
except in one remaining race: run A deletes and creates, then run B, which read the lapsed lease
before A's create, deletes A's fresh lease and creates its own. The read-back after a short
settle delay catches most of that (A sees B's owner on its read-back); what is left is a window
of about the settle delay (0.2 s) between two takeovers of the same lapsed lease.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bif.errors import RunConflictError
from bif.store.fs import atomic_write, get_fs, is_local, join, storage_error

LEASE_FILE = "lease.json"
#: Local disks: held (flock) while a run acquires the lease; see the module docstring.
LEASE_LOCK_FILE = "lease.lock"
DEFAULT_TTL_S = 120.0
_SETTLE_S = 0.2


class OutputBusyError(RunConflictError):
    """Another live run holds the output's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Owners of the leases this process holds now (a lease of this process not in here is a
#: leftover of an ended run whose release could not reach the store).
_HELD: set[str] = set()


def lease_lapsed(lease: Mapping[str, Any], *, now: float | None = None) -> bool:
    """True if ``lease`` has expired, or its holder ran on this host and is gone (or has ended)."""
    now = time.time() if now is None else now
    if float(lease.get("expires_at") or 0) <= now:
        return True
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        if lease["pid"] == os.getpid():
            return lease.get("owner") not in _HELD
        return not _pid_alive(lease["pid"])
    return False


def busy_message(uri: str, lease: Mapping[str, Any]) -> str:
    left = max(0.0, float(lease.get("expires_at") or 0) - time.time())
    return (f"output {uri!r} is in use by another run (owner {lease.get('owner')}, host {lease.get('host')}, "
            f"pid {lease.get('pid')}; its lease expires in {left:.0f} s unless renewed). Wait for it to end, "
            "or use another --output. If that run crashed, its lease lapses on its own after the expiry.")


@dataclass
class OutputLease:
    """The lease this process holds on ``uri``; see the module docstring."""

    uri: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    ttl_s: float = DEFAULT_TTL_S
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def _fs_path(self):
        fs, root = get_fs(self.uri, self.storage_options)
        return fs, join(root, LEASE_FILE)

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": now, "expires_at": now + self.ttl_s}

    def read(self) -> dict[str, Any] | None:
        """The lease file's content, or None when there is none (or it is unreadable)."""
        fs, path = self._fs_path
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {"owner": "unreadable", "expires_at": 0}  # a torn local write: treat as lapsed
        except Exception as err:  # noqa: BLE001
            raise storage_error("reading the lease", path, fs, err) from None

    def _create(self, data: bytes) -> bool:
        """Create the lease file only if it does not exist; False if it does."""
        fs, path = self._fs_path
        try:
            if is_local(fs):  # the folder exists: _local_lock made it
                tmp = f"{path}.{self.owner}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                try:
                    os.link(tmp, path)  # atomic, and fails if the lease exists: readers never see it half-written
                finally:
                    os.unlink(tmp)
                return True
            try:
                fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
            except TypeError:  # a backend without conditional create: check, then write
                if fs.exists(path):
                    return False
                fs.pipe_file(path, data)
            return True
        except FileExistsError:
            return False
        except Exception as err:  # noqa: BLE001
            raise storage_error("creating the lease", path, fs, err) from None

    def acquire(self) -> "OutputLease":
        """Take the lease or raise OutputBusyError; starts the heartbeat."""
        _HELD.add(self.owner)  # before the create: other threads of this process must see it as live
        try:
            return self._acquire()
        except BaseException:
            _HELD.discard(self.owner)
            raise

    def _acquire(self) -> "OutputLease":
        with self._local_lock() as locked:
            return self._acquire_once(settle=not locked)

    @contextlib.contextmanager
    def _local_lock(self) -> Iterator[bool]:
        """Hold an exclusive ``flock`` of the output's lease.lock (making the output's folder first); yields False
        (nothing held) on an object store or a local filesystem without flock."""
        fs, path = self._fs_path
        if not is_local(fs):
            yield False
            return
        import fcntl

        try:
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(os.path.join(os.path.dirname(path), LEASE_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise storage_error("creating the lease lock", path, fs, err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock here (some network or FUSE mounts): the settle delay instead
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the flock

    def _acquire_once(self, *, settle: bool) -> "OutputLease":
        fs, path = self._fs_path
        for _ in range(3):
            if self._create(json.dumps(self._record(), allow_nan=False).encode()):
                if settle:
                    time.sleep(_SETTLE_S)
                held = self.read()
                if held is not None and held.get("owner") == self.owner:
                    self._start_heartbeat()
                    return self
                if held is not None and not lease_lapsed(held):
                    raise OutputBusyError(busy_message(self.uri, held))
                continue
            held = self.read()
            if held is None:
                continue
            if not lease_lapsed(held):
                raise OutputBusyError(busy_message(self.uri, held))
            try:  # a crashed run's lapsed lease: remove it and try to create ours
                fs.rm_file(path)
            except FileNotFoundError:
                pass
        held = self.read() or {}
        raise OutputBusyError(busy_message(self.uri, held))

    def renew(self) -> None:
        """Push the expiry forward; marks the lease lost if another run now holds it."""
        fs, path = self._fs_path
        held = self.read()
        if held is not None and held.get("owner") != self.owner:
            self.lost = True
            return
        rec = self._record() | {"acquired_at": (held or {}).get("acquired_at", time.time())}
        atomic_write(fs, path, json.dumps(rec, allow_nan=False).encode())

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a store outage: the run itself will fail on its writes
                    pass

        self._thread = threading.Thread(target=beat, name="bif-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (best effort)."""
        self._stop.set()
        _HELD.discard(self.owner)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self.read()
            if held is not None and held.get("owner") == self.owner:
                fs, path = self._fs_path
                fs.rm_file(path)
        except Exception:  # noqa: BLE001 - an unreachable store: the lease lapses at its expiry
            pass

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_lease(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise OutputBusyError if a live run holds ``uri``'s lease (pre-flight; takes nothing)."""
    held = OutputLease(uri, dict(storage_options or {})).read()
    if held is not None and not lease_lapsed(held):
        raise OutputBusyError(busy_message(uri, held))
