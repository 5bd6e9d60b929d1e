"""The benchmark's own code runs end to end at a tiny scale, so it cannot rot. No assertion on speed. The peers'
comparison (bench/peers.py, `make bench-peers`) is not run here: its slow clients and tables are, against fakes."""

import json
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench import models, peers, run
from bench.slow_clients import slow_clients_beside_one
from bench.stack import ROOT

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="make test installs wrk; run through make")


@pytest.mark.integration
@needs_wrk
def test_tiny_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    run.main(
        [
            "--concurrency",
            "1,2",
            "--seconds",
            "1",
            "--images",
            "500x375",
            "--engine-seconds",
            "1",
            "--open-loop-seconds",
            "1",
            "--overload",
            "8",
            "--out",
            str(tmp_path),
            "--name",
            "tiny",
        ]
    )
    result = json.loads((tmp_path / "tiny.json").read_text())
    rows = result["images"]["scene-500x375.jpg"]["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    assert all(row["requests_per_s"] > 0 and row["non_2xx"] == 0 for row in rows)
    assert result["engine_alone"]["images_per_s"] > 0
    assert result["in_process"]["scene-500x375.jpg"]["requests_per_s"] > 0
    assert result["summary"]["scene-500x375.jpg"]["serving_efficiency"] > 0
    assert result["open_loop"]["statuses"].get(200, 0) > 0 or result["open_loop"]["statuses"].get("200", 0) > 0
    assert len(result["worker_rss_mb"]) >= 1 and result["ready_s"] > 0
    assert "baseline" not in result and "ratios" not in result
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| concurrency | requests/s |" in table and "engine alone" in table and "serving efficiency" in table


def head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.mark.integration
@needs_wrk
def test_baseline_runs_the_same_benchmark_on_a_worktree_of_ref_and_reports_ratios(tmp_path, capsys):
    before = head()  # others may commit to this checkout during the run
    run.main(
        ["--baseline", "HEAD", "--concurrency", "1", "--seconds", "1", "--images", "500x375", "--engine-seconds", "1",
         "--open-loop-seconds", "0", "--overload", "0", "--out", str(tmp_path), "--name", "tiny"]
    )
    result = json.loads((tmp_path / "tiny.json").read_text())
    baseline, ratios = result["baseline"], result["ratios"]
    assert baseline["ref"] == "HEAD" and baseline["tree"]["commit"] in (before, head())
    tree = Path(baseline["tree"]["root"])
    # The baseline's own code served it: its segapp in-process, its default model mapped by its stack's workers.
    assert baseline["engine_alone"]["segapp"] == str(tree / "segapp")
    assert baseline["in_process"]["scene-500x375.jpg"]["segapp"] == str(tree / "segapp")
    assert baseline["workers_model"] and all(Path(path).is_relative_to(tree) for path in baseline["workers_model"])
    assert result["engine_alone"]["segapp"] == str(ROOT / "segapp")
    for figures in (result, baseline):
        (row,) = figures["images"]["scene-500x375.jpg"]["rows"]
        assert row["concurrency"] == 1 and row["requests_per_s"] > 0 and row["non_2xx"] == 0
    new_row, base_row = (f["images"]["scene-500x375.jpg"]["rows"][0] for f in (result, baseline))
    ratio_row = ratios["images"]["scene-500x375.jpg"]["rows"][0]
    expected = new_row["requests_per_s"] / base_row["requests_per_s"]
    assert ratio_row["requests_per_s"] == pytest.approx(expected, abs=1e-3)
    assert ratio_row["concurrency"] == 1
    assert ratios["engine_alone"]["images_per_s"] == pytest.approx(
        result["engine_alone"]["images_per_s"] / baseline["engine_alone"]["images_per_s"], abs=1e-3
    )
    assert ratios["summary"]["scene-500x375.jpg"]["serving_efficiency"] > 0
    assert ratios["in_process"]["scene-500x375.jpg"]["requests_per_s"] > 0
    # The worktree is gone, from the disk and from git's list.
    assert not tree.exists()
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(tree) not in listed
    table = capsys.readouterr().out
    assert "baseline: HEAD" in table and "x) |" in table


@pytest.mark.integration
@needs_wrk
def test_models_benchmark_serves_one_two_and_three_models_and_writes_its_tables_and_json(tmp_path, capsys):
    models.main(["--seconds", "1", "--rounds", "1", "--warmup-seconds", "1", "--out", str(tmp_path), "--name", "tiny"])
    result = json.loads((tmp_path / "tiny.json").read_text())
    (runs,) = result["rounds"]
    assert sorted(runs) == ["1", "2", "3"]
    # The workers of each stack mapped every network of its repository, and no other.
    assert runs["1"]["mapped"] == ["segapp-unet/1/model.tflite"]
    assert runs["3"]["mapped"] == ["person/1/model.tflite", "segapp-unet-float/1/model.tflite",
                                   "segapp-unet/1/model.tflite"]
    for figures in runs.values():
        assert figures["ready_s"] > 0 and len(figures["after_warmup"]["worker_rss_mb"]) == 2
        assert 0 < max(figures["after_warmup"]["worker_private_mb"]) < min(figures["after_warmup"]["worker_rss_mb"])
        assert figures["default"]["requests_per_s"] > 0 and figures["default"]["non_2xx"] == 0
    assert "person" not in runs["1"] and runs["3"]["person"]["requests_per_s"] > 0
    assert runs["3"]["person"]["non_2xx"] == 0
    assert result["summary"]["rps_ratio_3_over_1"] > 0 and result["summary"]["3"]["person_requests_per_s"] > 0
    table = capsys.readouterr().out
    assert "| models | stacks started |" in table and "person (3 models loaded)" in table


class _ImageServer(socketserver.ThreadingTCPServer):
    """A fake server that reads each POST's body in a thread of its own, as a sync worker does, and answers 200 once
    the body is whole; it counts the connections that ended with their body unfinished."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ImageHandler)
        self.unfinished = []  # body bytes received by each connection that closed before its body was whole


class _ImageHandler(socketserver.StreamRequestHandler):
    def handle(self):
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        received = 0
        try:
            while received < length and (chunk := self.rfile.read1(length - received)):
                received += len(chunk)
        except OSError:
            pass
        if received < length:
            self.server.unfinished.append(received)
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def test_slow_clients_hold_their_uploads_open_beside_a_normal_client_and_close_every_one():
    server = _ImageServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = bytes(range(256)) * 40
    try:
        figures = slow_clients_beside_one("127.0.0.1", server.server_address[1], "/infer", body, slow=4, seconds=0.5,
                                          timeout_s=2, chunk=8, interval_s=0.1, settle_s=0.2)
        deadline = time.monotonic() + 5
        while len(server.unfinished) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.shutdown()
        server.server_close()
    assert figures["slow_held_at_start"] == 4 and figures["slow_opened"] == 4 and figures["slow_left_open"] == 0
    assert figures["slow_ended_by_server"] == 0
    assert figures["sent"] > 0 and figures["answered_200"] == figures["sent"] and figures["timed_out"] == 0
    assert figures["p50_ms"] > 0 and figures["p99_ms"] >= figures["p50_ms"]
    # Each slow client sent some of its body, never all of it, and its connection was closed at the end.
    assert len(server.unfinished) == 4 and all(0 < received < len(body) for received in server.unfinished)


def test_a_normal_client_that_gets_no_answer_counts_timeouts():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts into its backlog, never answers
        figures = slow_clients_beside_one("127.0.0.1", silent.getsockname()[1], "/infer", b"x" * 1000, slow=0,
                                          seconds=0.3, timeout_s=0.2, settle_s=0)
    assert figures["sent"] >= 1 and figures["timed_out"] == figures["sent"] == figures["failed"]
    assert figures["p99_ms"] is None and figures["p99_all_ms"] >= 200


def _wrk_row(requests_per_s, p50_ms):
    return {"requests_per_s": requests_per_s, "p50_ms": p50_ms, "p99_ms": 2 * p50_ms, "non_2xx": 0}


def test_peers_tables_show_medians_over_rounds_and_the_normal_client_beside_slow_ones():
    result = {"image": {"name": "scene-500x375.jpg", "bytes": 63440}, "rounds": 3, "seconds": 10,
              "in_process_requests_per_s": [200, 210, 190], "servers": {}}
    for name, base in (("segapp", 150), ("flask", 180), ("fastapi", 170)):
        result["servers"][name] = {"rounds": {"1": [_wrk_row(base + d, 5.0 + d / 10) for d in (0, 4, -2)],
                                              "8": [_wrk_row(2 * base + d, 20.0) for d in (0, 6, -6)]}}
    result["servers"]["flask"]["slow_clients"] = {
        "slow_clients": 64, "trickle": "16 bytes every 1 s", "seconds": 20, "timeout_s": 10, "sent": 2,
        "answered_200": 0, "failed": 2, "timed_out": 2, "p50_ms": None, "p99_ms": None, "p99_all_ms": 10003.1,
        "slow_held_at_start": 64, "slow_ended_by_server": 0}
    peers.summarize(result)
    segapp = result["servers"]["segapp"]
    assert segapp["median"]["1"]["requests_per_s"] == 150 and segapp["median"]["1"]["p50_ms"] == 5.0
    assert segapp["median"]["8"]["rounds_requests_per_s"] == [300, 306, 294]
    assert result["in_process_median_requests_per_s"] == 200 and segapp["serving_efficiency"] == 1.5
    table = peers.markdown(result)
    assert "| segapp (nginx -> uWSGI -> segapp) | 150 (148-154) | 5.0 ms | 300 (294-306) | 20.0 ms | 1.5 | 0 |" in table
    assert "| Flask under gunicorn, 2 sync workers, no proxy | 0 / 2 | 2 | 0 | - | - | 10003.1 ms | 64 | 0 |" in table
