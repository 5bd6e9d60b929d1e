"""segapp.metrics_files and a full metrics folder: space reserved before it is mapped, values kept in memory without it.

A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stands in for a full file system here, so no root is needed: past it
posix_fallocate and ftruncate fail (EFBIG) as they fail with ENOSPC on a full one. The SIGBUS itself, which needs a
full tmpfs, is tests/integration/test_run_folder.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

from segapp.metrics_files import INITIAL_SIZE, ReservedMmapedDict
from tests.test_metrics import BUSY, MULTIPROCESS_ENV, REPO, end, infer_total, sample, scrape, start

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
"""

# A worker whose files get their first 64 KiB and no more: 300 routes' histograms need more than that.
GROWING = LIMITED + """
from segapp.metrics import Metrics
metrics = Metrics.from_env()
for route in range(300):
    metrics.observe_request(f"/route/{route}", "GET", 200, 0.01)
print("served", metrics.requests.labels("/route/299", "GET", "200")._value.get(), flush=True)
"""

SCRAPE = LIMITED + """
from segapp.metrics import Metrics
print(Metrics(sys.argv[2]).exposition()[0].decode())
"""


def run(script: str, folder: Path, *args) -> subprocess.CompletedProcess:
    environ = {**os.environ, MULTIPROCESS_ENV: str(folder), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=environ, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_reserved_file_has_its_blocks_before_it_is_mapped(tmp_path):
    reserved = ReservedMmapedDict(str(tmp_path / "counter_1.db"))
    keys = [f"a key of about a hundred bytes, as prometheus_client's are: {key:040d}" for key in range(1000)]
    for value, key in enumerate(keys):  # grows the file past its first 64 KiB, twice
        reserved.write_value(key, float(value), 0.0)
    reserved.close()
    size = os.stat(tmp_path / "counter_1.db").st_size
    assert size > INITIAL_SIZE
    assert os.stat(tmp_path / "counter_1.db").st_blocks * 512 >= size  # no hole a write could fault on
    stored = MmapedDict(str(tmp_path / "counter_1.db"), read_mode=True)
    assert {key: value for key, value, _ in stored.read_all_values()} == {key: float(v) for v, key in enumerate(keys)}
    stored.close()


def test_a_worker_whose_files_cannot_grow_serves_and_says_so_once(tmp_path):
    done = run(GROWING, tmp_path, INITIAL_SIZE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["served", "1.0"]  # the value without a file still counts, in memory
    assert done.stderr.count("kept in memory") == 1, done.stderr
    # What got a file before the limit is in the sums.
    text = scrape(tmp_path)
    assert sample(text, "segapp_requests_total", route="/route/0", method="GET", status="200") == 1
    assert sample(text, "segapp_request_duration_seconds_count", route="/route/299") is None


def test_a_worker_with_no_room_at_all_serves(tmp_path):
    done = run(GROWING, tmp_path, 1)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("kept in memory") == 1, done.stderr
    # No empty file is left behind: prometheus_client could not read one, and every scrape would fail.
    assert not [path for path in tmp_path.glob("*.db") if path.stat().st_size == 0]
    assert infer_total(scrape(tmp_path)) == 0


def test_a_merge_without_room_leaves_the_counts_where_they_are(tmp_path):
    end(start(BUSY, tmp_path, 6))
    end(start(BUSY, tmp_path, 5))  # merges the first into the archive on entering
    # A scrape with no room for the merge of the second: its files stay, and count.
    done = run(SCRAPE, tmp_path, 1, tmp_path)
    assert done.returncode == 0, done.stderr
    assert infer_total(done.stdout) == 11
    assert done.stderr.count("left unmerged") == 1, done.stderr
    assert not list(tmp_path.glob("*.new")) and "merge.journal" not in os.listdir(tmp_path)
    # With room again, the next scrape merges it: only the archives are left.
    assert infer_total(scrape(tmp_path)) == 11
    assert sorted(path.name for path in tmp_path.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
