"""prometheus_client's multiprocess files with their space reserved before it is mapped, so a full disk is an error.

prometheus_client's MmapedDict sizes its file with ftruncate and maps it. On a full file system ftruncate succeeds (the
file is sparse), and the first touch of a page that has no block behind it kills the process with SIGBUS: a worker
starting in a full run folder died at once, uWSGI respawned it, it died again (issue 15). Here every page is reserved
with posix_fallocate before it is mapped, so a full disk is an OSError (ENOSPC) at that point, which is caught.

A value whose key cannot get space in its file is kept in this process's memory only (it is missing from /metrics'
sums); every other value keeps its file. The first such failure is logged, once per process.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading

from prometheus_client.mmap_dict import MmapedDict, mmap_key

log = logging.getLogger(__name__)

# MmapedDict's first size for a file, doubled as it fills (prometheus_client.mmap_dict._INITIAL_MMAP_SIZE).
INITIAL_SIZE = 1 << 16


def reserve(path: str, size: int) -> None:
    """Give file `path` (made if missing) real blocks for its first `size` bytes; OSError (ENOSPC) when there are none.

    A file this made empty and could not reserve is removed: prometheus_client cannot read a file of 0 bytes."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        # posix_fallocate, not fallocate(2): glibc writes the blocks itself where the file system cannot reserve them.
        os.posix_fallocate(descriptor, 0, max(size, os.fstat(descriptor).st_size))
    except OSError:
        if os.fstat(descriptor).st_size == 0:
            os.unlink(path)
        raise
    finally:
        os.close(descriptor)


class ReservedMmapedDict(MmapedDict):
    """A MmapedDict whose file's pages all have blocks before they are mapped: writes to its mapping never fault.
    Making one, or adding a key that needs the file to grow, raises OSError when the file system is full."""

    def __init__(self, filename: str, read_mode: bool = False):
        if not read_mode:
            reserve(filename, INITIAL_SIZE)  # also fills the holes of a sparse file left by an earlier process
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        # MmapedDict's own entry: length, key padded to 8 bytes, value and timestamp; it doubles the file to fit it.
        encoded = len(key.encode("utf-8"))
        entry = struct.calcsize("i") + encoded + (8 - (encoded + 4) % 8) + 16
        capacity = self._capacity
        while self._used + entry > capacity:
            capacity *= 2
        if capacity > self._capacity:
            reserve(self._fname, capacity)
        super()._init_value(key)


def reserved_value_class(directory: str) -> type:
    """A prometheus_client value class (for `prometheus_client.values.ValueClass`) like its MultiProcessValue(): one
    file per metric type in `directory` under this process's pid, the same names and format, but on
    ReservedMmapedDict. One class per folder and process, so two sets of metrics never map one file twice. Values
    made in a process forked after this was called are not supported (make metrics after the fork: lazy-apps)."""
    return _value_class(os.fspath(directory), os.getpid())


@functools.cache
def _value_class(directory: str, pid: int) -> type:
    files: dict[str, ReservedMmapedDict] = {}
    lock = threading.Lock()
    reported = []

    def no_space(error: OSError) -> None:
        if not reported:
            reported.append(error)
            log.warning("metrics of process %d kept in memory, not in %s (%s): missing from /metrics until it restarts;"
                        " see docs/operations.md, \"The run folder\"", pid, directory, error)

    def file_for(prefix: str) -> ReservedMmapedDict | None:
        if prefix not in files:
            try:
                files[prefix] = ReservedMmapedDict(os.path.join(directory, f"{prefix}_{pid}.db"))
            except OSError as error:
                no_space(error)
                return None
        return files[prefix]

    class ReservedValue:
        """A float kept in this process's file for its metric type, or in memory when the file has no room for it."""

        _multiprocess = True

        def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="",
                     **kwargs):
            self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
            self._value = self._timestamp = 0.0
            with lock:
                self._file = file_for(f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ)
                if self._file is not None:
                    try:
                        self._value, self._timestamp = self._file.read_value(self._key)  # makes the key's entry
                    except OSError as error:
                        no_space(error)
                        self._file = None

        def _store(self) -> None:
            if self._file is not None:  # its entry exists: writing to reserved pages cannot fail
                self._file.write_value(self._key, self._value, self._timestamp)

        def inc(self, amount):
            with lock:
                self._value += amount
                self._timestamp = 0.0
                self._store()

        def set(self, value, timestamp=None):
            with lock:
                self._value = value
                self._timestamp = timestamp or 0.0
                self._store()

        def set_exemplar(self, exemplar):
            return  # not in multiprocess mode, as in prometheus_client

        def get(self):
            with lock:
                return self._value

        def get_exemplar(self):
            return None

    return ReservedValue
