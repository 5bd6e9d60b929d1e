"""The folder of prometheus_client's multiprocess files, kept as small as the processes alive.

prometheus_client writes one file per process and metric type (`counter_PID.db`, `histogram_PID.db`,
`gauge_livesum_PID.db`) and deletes only a dead process's live gauges, and only when told (`mark_process_dead`).
Counters and histograms stay for ever, so with workers recycled by max-requests or killed, the folder and the time
of each scrape grow without end (prometheus/client_python#204, #275, #367). The known way out (client_python#275,
PR #518) is applied here, with the locking that PR's review asked for:

- the counters and histograms of a process that has ended are merged, with `MultiProcessCollector.merge`, into one
  archive file per type, `counter_archive.db` and `histogram_archive.db`, and its own files deleted; its live
  gauges are deleted, so it leaves the in-flight sum;
- every merge holds `merge.lock` exclusively and every scrape holds it shared, so a scrape sees each count once;
- a merge writes the new archive beside the old one and replaces it; a journal of what it absorbed lets the next
  merge finish the deletions of one killed half-way, so nothing is counted twice or lost;
- a process is alive while it holds the flock of its `alive_PID.lock` (taken by `enter`): the kernel releases it
  however the process ends, SIGKILL included, and a later process given the same pid does not inherit it. A process
  that never entered is alive while its pid exists.

On a full file system a merge cannot write its archive (segapp.metrics_files reserves the space first, so this is an
OSError, not a SIGBUS): the ended processes' counters and histograms then stay in their own files, where they still
count, and a later merge, when there is room, absorbs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re

from prometheus_client.mmap_dict import mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from segapp.metrics_files import ReservedMmapedDict

log = logging.getLogger(__name__)

ARCHIVE = "archive"
LOCK_NAME = "merge.lock"
JOURNAL_NAME = "merge.journal"
# Types whose values add up over processes; a live gauge of a dead process is dropped instead.
MERGED_TYPES = ("counter", "histogram", "summary")
_PROCESS_FILE = re.compile(r"^(?P<prefix>[a-z_]+)_(?P<pid>\d+)\.db$")
_ALIVE_FILE = re.compile(r"^alive_(?P<pid>\d+)\.lock$")

# (folder, pid) -> the descriptor whose flock says that process is alive; kept open for the process's life.
_entered: dict[tuple[str, int], int] = {}
# The first merge this process gave up for want of space, so that it is logged once, not at every scrape.
_abandoned: list[OSError] = []


class MetricsFolder:
    """A PROMETHEUS_MULTIPROC_DIR folder: processes enter it, scrapes read it, ended processes are merged away."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def enter(self) -> None:
        """Count this process as alive until it ends. Call before it writes any metric: files already under its
        pid are an earlier process's (pids are reused) and are merged away first. Processes found dead are too."""
        key = (os.path.realpath(self.path), os.getpid())
        if key in _entered:
            return
        with self._locked(fcntl.LOCK_EX):
            self._retire_locked([key[1]] + [pid for pid in self._pids() if self._is_dead(pid)])
            descriptor = os.open(self._alive_path(key[1]), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # Blocks only while another process's sweep probes this file, a few microseconds.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            _entered[key] = descriptor

    def sweep(self) -> list[int]:
        """Merge away every process found dead; returns their pids. Cheap when none is: no lock is taken."""
        if not os.path.exists(self._journal_path) and not any(self._is_dead(pid) for pid in self._pids()):
            return []
        with self._locked(fcntl.LOCK_EX):
            dead = [pid for pid in self._pids() if self._is_dead(pid)]
            self._retire_locked(dead)
        return dead

    def retire(self, pids) -> None:
        """Merge the counters and histograms of processes `pids` (ended, or this one as it exits) into the archive
        and delete their files. A retired process's later writes are lost."""
        with self._locked(fcntl.LOCK_EX):
            self._retire_locked(list(pids))

    @contextlib.contextmanager
    def reading(self):
        """While inside, no merge runs: the folder's files hold every count exactly once. Sweeps first."""
        while True:
            self.sweep()
            with self._locked(fcntl.LOCK_SH):
                # A merge killed half-way leaves its journal: finish it (above) before reading.
                if not os.path.exists(self._journal_path):
                    yield
                    return

    def files(self) -> list[str]:
        """The names of the folder's entries."""
        return sorted(os.listdir(self.path))

    @property
    def _journal_path(self) -> str:
        return os.path.join(self.path, JOURNAL_NAME)

    def _alive_path(self, pid: int) -> str:
        return os.path.join(self.path, f"alive_{pid}.lock")

    def _archive_path(self, typ: str) -> str:
        return os.path.join(self.path, f"{typ}_{ARCHIVE}.db")

    @contextlib.contextmanager
    def _locked(self, operation: int):
        descriptor = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, operation)
            if operation == fcntl.LOCK_EX:
                self._finish_journal()
            yield
        finally:
            os.close(descriptor)  # releases the flock

    def _files_by_pid(self) -> dict[int, list[str]]:
        by_pid: dict[int, list[str]] = {}
        for name in os.listdir(self.path):
            found = _PROCESS_FILE.match(name) or _ALIVE_FILE.match(name)
            if found:
                by_pid.setdefault(int(found["pid"]), []).append(name)
        return by_pid

    def _pids(self) -> list[int]:
        return sorted(self._files_by_pid())

    def _is_dead(self, pid: int) -> bool:
        if (os.path.realpath(self.path), pid) in _entered:
            return False
        try:
            descriptor = os.open(self._alive_path(pid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return not _pid_exists(pid)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(descriptor)
        return True

    def _retire_locked(self, pids: list[int]) -> None:
        pids = list(dict.fromkeys(pids))  # a pid twice would be merged twice
        by_pid = self._files_by_pid()
        sources: dict[str, list[str]] = {}
        for pid in pids:
            for name in by_pid.get(pid, []):
                prefix = name.rsplit("_", 1)[0]
                if prefix in MERGED_TYPES:
                    sources.setdefault(prefix, []).append(name)
        if sources:
            try:
                journal = {typ: self._merge(typ, names) for typ, names in sources.items()}
                _write_json(self._journal_path, journal)
            except OSError as error:
                self._abandon_merge(sources, error)
            else:
                for typ in journal:
                    os.replace(self._archive_path(typ) + ".new", self._archive_path(typ))
                self._finish_journal()
        for pid in pids:
            for name in by_pid.get(pid, []):
                if name.startswith("gauge_live"):
                    _remove(os.path.join(self.path, name))
            descriptor = _entered.pop((os.path.realpath(self.path), pid), None)
            if descriptor is not None:
                os.close(descriptor)
            _remove(self._alive_path(pid))

    def _abandon_merge(self, sources: dict[str, list[str]], error: OSError) -> None:
        """No room for the new archives (or the journal): delete what was written; the sources stay and count."""
        for typ in sources:
            _remove(self._archive_path(typ) + ".new")
        if not _abandoned:
            _abandoned.append(error)
            log.warning("metrics of ended processes left unmerged in %s (%s): they still count; merged once there is "
                        "room", self.path, error)

    def _merge(self, typ: str, names: list[str]) -> dict:
        """Writes the archive of `typ` plus files `names` beside the archive; returns its journal entry."""
        archive = self._archive_path(typ)
        inputs = [archive] if os.path.exists(archive) else []
        inputs += [os.path.join(self.path, name) for name in names]
        _remove(archive + ".new")  # left by a merge killed before its journal: MmapedDict would read it back
        merged = ReservedMmapedDict(archive + ".new")
        try:
            # accumulate=False: the values as stored (histogram buckets not cumulated), fit to be written back.
            for metric in MultiProcessCollector.merge(inputs, accumulate=False):
                for sample in metric.samples:
                    key = mmap_key(metric.name, sample.name, list(sample.labels), list(sample.labels.values()),
                                   metric.documentation)
                    merged.write_value(key, sample.value, 0.0)
        finally:
            merged.close()
        return {"archive": os.stat(archive + ".new").st_ino,
                "sources": [[name, os.stat(os.path.join(self.path, name)).st_ino] for name in names]}

    def _finish_journal(self) -> None:
        """After a merge, or one killed half-way: delete the sources each replaced archive absorbed."""
        try:
            with open(self._journal_path) as file:
                journal = json.load(file)
        except FileNotFoundError:
            return
        for typ, entry in journal.items():
            if _inode(self._archive_path(typ)) != entry["archive"]:
                continue  # killed before this archive was replaced: its sources still count, in their own files
            for name, inode in entry["sources"]:
                if _inode(os.path.join(self.path, name)) == inode:
                    _remove(os.path.join(self.path, name))
        _remove(self._journal_path)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _write_json(path: str, value) -> None:
    with open(path + ".new", "w") as file:
        json.dump(value, file)
    os.replace(path + ".new", path)
