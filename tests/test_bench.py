"""The benchmark's own code runs end to end at a tiny scale, so it cannot rot. No assertion on speed."""

import json
import shutil

import pytest

from bench import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="make test installs wrk; run through make"),
]


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
    assert result["open_loop"]["statuses"].get(200, 0) > 0 or result["open_loop"]["statuses"].get("200", 0) > 0
    assert len(result["worker_rss_mb"]) >= 1 and result["ready_s"] > 0
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| concurrency | requests/s |" in table and "engine alone" in table
