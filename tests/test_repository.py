"""The model repository: which versions are served (latest, or the card's list), the default model, what a reload
refuses and keeps, and each way a repository can be wrong, in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from segapp.inference import SHIPPED_MODEL, card_path
from segapp.repository import ModelLoadError, ModelRepository, UnknownModel


def add(folder, name: str, version: int, network: bytes | None = None, card: dict | None = None):
    (folder / name / str(version)).mkdir(parents=True)
    target = folder / name / str(version) / "model.tflite"
    target.write_bytes(network) if network is not None else shutil.copyfile(SHIPPED_MODEL, target)
    if card is not None or not (folder / name / "model.json").exists():
        shipped = json.loads(card_path(SHIPPED_MODEL).read_text())
        (folder / name / "model.json").write_text(json.dumps({**shipped, "name": name, **(card or {})}))


def states(repository: ModelRepository, name: str) -> dict[str, str]:
    return {v.version: v.state for v in repository.models[name].versions}


def test_the_highest_version_is_served_and_the_others_listed(tmp_path):
    for version in (1, 2, 10):
        add(tmp_path, "m", version)
    repository = ModelRepository.load(tmp_path)
    assert repository.get().version == "10" and repository.default_model == "m"
    assert states(repository, "m") == {"10": "ready", "2": "unavailable", "1": "unavailable"}
    with pytest.raises(UnknownModel, match="unknown version '2'.*served: 10"):
        repository.get("m", "2")


def test_the_cards_versions_are_served_side_by_side(tmp_path):
    add(tmp_path, "m", 1, card={"versions": [1, 3]})
    add(tmp_path, "m", 2)
    add(tmp_path, "m", 3)
    repository = ModelRepository.load(tmp_path)
    assert [v.version for v in repository.models["m"].served] == ["3", "1"]
    assert repository.get("m", "1").version == "1" and repository.get("m").version == "3"
    assert states(repository, "m")["2"] == "unavailable"


def test_a_reload_refuses_a_broken_new_version_and_serves_the_one_before(tmp_path):
    add(tmp_path, "m", 1)
    add(tmp_path, "m", 2, network=b"not a network")
    with pytest.raises(ModelLoadError, match="m/2/model.tflite: cannot be loaded"):
        ModelRepository.load(tmp_path)  # at start: the server stops
    repository = ModelRepository.load(tmp_path, strict=False)
    assert repository.get("m").version == "1"
    assert states(repository, "m") == {"2": "failed", "1": "ready"}
    assert repository.index() == [
        {"name": "m", "version": "2", "state": "UNAVAILABLE", "reason": repository.models["m"].versions[0].reason},
        {"name": "m", "version": "1", "state": "READY", "reason": ""}]
    assert repository.index(ready_only=True) == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


def test_a_model_without_a_version_folder_is_unavailable_and_the_server_starts(tmp_path, caplog):
    add(tmp_path, "m", 1)
    (tmp_path / "later").mkdir()
    repository = ModelRepository.load(tmp_path, default_model="m")
    assert repository.models["later"].state == "unavailable" and "no version folder" in caplog.text
    assert repository.index()[0] == {"name": "later", "state": "UNAVAILABLE",
                                     "reason": repository.models["later"].reason}
    with pytest.raises(UnknownModel, match="'later' is unavailable"):
        repository.get("later")


def test_the_default_model(tmp_path):
    add(tmp_path, "a", 1)
    add(tmp_path, "b", 1)
    with pytest.raises(ModelLoadError, match="2 models and no default"):
        ModelRepository.load(tmp_path)
    assert ModelRepository.load(tmp_path, default_model="b").get().name == "b"
    (tmp_path / "repository.json").write_text('{"default_model": "a"}')
    assert ModelRepository.load(tmp_path).get().name == "a"
    with pytest.raises(ModelLoadError, match="default model 'c' is not served"):
        ModelRepository.load(tmp_path, default_model="c")


@pytest.mark.parametrize("spoil, message", [
    (lambda d: (d / "m" / "model.json").write_text('{"name": "other"}'), "names the model 'other'.*folder is 'm'"),
    (lambda d: (d / "m" / "model.json").write_text('{"versions": "all"}'), "'versions' must list positive"),
    (lambda d: (d / "m" / "1" / "model.onnx").write_bytes(b"x"), "holds one network.*model.tflite, model.onnx"),
    (lambda d: (d / "bad name!").mkdir(), "'bad name!' is not a model name"),
    (lambda d: (d / "m" / "model.json").write_text('{"input": {"meen": 0}}'), "unknown key 'input.meen'"),
    (lambda d: (d / "m" / "model.json").write_text('{"input": {"size": [64, 64]}}'), "input width is 64.*takes 128"),
    (lambda d: (d / "m" / "model.json").write_text('{"output": {"kind": "sigmoid"}}'), "sigmoid needs one channel"),
])
def test_each_mistake_is_one_line_naming_the_folder(tmp_path, spoil, message):
    add(tmp_path, "m", 1)
    spoil(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as refused:
        ModelRepository.load(tmp_path, default_model="m")
    assert "\n" not in str(refused.value) and str(tmp_path) in str(refused.value)
