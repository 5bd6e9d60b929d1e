"""The benchmark's own code runs end to end at a tiny scale, so it cannot rot. No assertion on speed."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import models, run
from bench.stack import ROOT

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
