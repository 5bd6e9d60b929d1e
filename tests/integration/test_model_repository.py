"""A model repository served by the real stack (nginx -> uWSGI -> segapp): several models side by side, versions
added and refused while it serves under load, and a broken model stopping it at start in one line."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from bench.stack import StackError
from segapp.inference import SHIPPED_MODEL, card_path
from tests.integration.test_reliability import RequestStream, touch_in_a_later_second

DEMO = "segapp-unet"


def readable_repository() -> Path:
    """A new repository folder with the demonstration model as version 1, that the workers' user can read."""
    folder = Path(tempfile.mkdtemp(prefix="segapp-repository-"))
    folder.chmod(0o755)
    add_version(folder, DEMO, 1)
    (folder / "repository.json").write_text(json.dumps({"default_model": DEMO}))
    return folder


def add_version(folder: Path, name: str, version: int, network: bytes | None = None) -> Path:
    """DIR/name/version/model.tflite: the shipped network (or `network`'s bytes), and the shipped card when the
    model has none yet."""
    model = folder / name
    (model / str(version)).mkdir(parents=True, mode=0o755)
    model.chmod(0o755)
    target = model / str(version) / "model.tflite"
    if network is None:
        shutil.copyfile(SHIPPED_MODEL, target)
    else:
        target.write_bytes(network)
    if not (model / "model.json").exists():
        card = json.loads(card_path(SHIPPED_MODEL).read_text())
        card["name"] = name
        (model / "model.json").write_text(json.dumps(card))
    return model


def report(load: RequestStream, what: str, record_property) -> None:
    """Counted: every request sent was answered with a 200 by the model it named, or is listed as failed."""
    sent, answered, failed = load.sent, load.outcomes.count("200"), len(load.failures)
    record_property(what, f"{sent} sent, {answered} answered, {failed} failed")
    print(f"\n{what}: {sent} sent = {answered} answered + {failed} failed")
    assert sent == answered + failed
    assert load.failures == []


def reload_workers(stack) -> None:
    """Touch the reload file and wait until every worker is a new one with its app loaded."""
    old = set(stack.worker_pids())
    touch_in_a_later_second(stack.run_dir / "reload")
    deadline = time.monotonic() + 120
    while set(stack.worker_pids()) & old or not all(w["apps"] for w in stack.stats()["workers"]):
        assert time.monotonic() < deadline, f"workers not all replaced:\n{stack.log()[-3000:]}"
        time.sleep(0.2)


def test_two_models_under_load_each_answer_from_the_model_asked(stack_factory, jpeg, record_property):
    folder = readable_repository()
    add_version(folder, "second", 3)
    stack = stack_factory(SEGAPP_MODEL_REPOSITORY=str(folder))
    models = stack.request("GET", "/v1/models").json()
    assert models["default_model"] == DEMO
    assert {m["name"]: m["served_versions"] for m in models["models"]} == {DEMO: ["1"], "second": ["3"]}
    queries = {"": f"{DEMO}/1", "?model=second": "second/3", f"?model={DEMO}&version=1": f"{DEMO}/1",
               "?model=second&version=3": "second/3"}
    with RequestStream(stack, jpeg, clients=8, models=queries) as load:
        load.wait_for(200)
    shutil.rmtree(folder, ignore_errors=True)
    report(load, "two models at c=8", record_property)


def test_a_version_and_a_model_added_then_a_broken_version_refused_under_load(stack_factory, jpeg, record_property):
    folder = readable_repository()
    # A repository of one model names no default; once a second is added, the one served stays the default.
    (folder / "repository.json").unlink()
    stack = stack_factory(SEGAPP_MODEL_REPOSITORY=str(folder))
    with RequestStream(stack, jpeg, clients=4) as load:
        load.wait_for(10)
        add_version(folder, DEMO, 2)
        add_version(folder, "added", 1)
        reload_workers(stack)
        load.wait_for(10)
        assert stack.infer(jpeg).headers["X-Model"] == f"{DEMO}/2"
        assert stack.infer(jpeg, query="?model=added").headers["X-Model"] == "added/1"
        # A version that cannot load, added while the server runs: refused, and version 2 keeps serving.
        add_version(folder, DEMO, 3, network=b"not a network")
        reload_workers(stack)
        load.wait_for(10)
    models = {m["name"]: m for m in stack.request("GET", "/v1/models").json()["models"]}
    shutil.rmtree(folder, ignore_errors=True)
    report(load, "version and model added, broken version refused", record_property)
    assert stack.infer(jpeg).headers["X-Model"] == f"{DEMO}/2"
    refused = {v["version"]: v for v in models[DEMO]["versions"]}["3"]
    assert refused["state"] == "failed" and "3/model.tflite" in refused["reason"]
    assert models[DEMO]["served_versions"] == ["2"] and models["added"]["state"] == "ready"
    assert [v["state"] for v in models[DEMO]["versions"]] == ["failed", "ready", "unavailable"]


@pytest.mark.parametrize("break_it, reason", [
    (lambda folder: add_version(folder, "broken", 1, network=b"not a network"), "broken/1/model.tflite"),
    (lambda folder: (folder / DEMO / "model.json").write_text('{"classes": ["a", "b"]}'), "names 2 classes"),
    (lambda folder: (folder / DEMO / "model.json").write_text("{not json"), "not a readable JSON card"),
    (lambda folder: (folder / DEMO / "1" / "model.tflite").rename(folder / DEMO / "1" / "model.pt"),
     "holds one network"),
    (lambda folder: (folder / DEMO / "model.json").write_text('{"versions": [4]}'), "lists 4, which has no folder"),
])
def test_a_model_that_cannot_load_stops_the_server_at_start_in_one_line(stack_factory, break_it, reason):
    folder = readable_repository()
    break_it(folder)
    with pytest.raises(StackError) as stopped:
        stack_factory(SEGAPP_MODEL_REPOSITORY=str(folder))
    shutil.rmtree(folder, ignore_errors=True)
    log = str(stopped.value)
    lines = [line for line in log.splitlines() if "cannot start:" in line]
    assert lines and reason in lines[0], log
    # The other worker, still importing when uWSGI destroys the instance, is stopped by SIGINT: a KeyboardInterrupt
    # traceback of the shutdown's may follow (seen once in CI). No other traceback.
    assert log.count("Traceback") == len(re.findall(r"^KeyboardInterrupt$", log, re.M)), log
