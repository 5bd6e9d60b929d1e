"""The models a server serves: a model repository folder, as Triton and TF Serving keep theirs.

    DIR/repository.json       optional: {"default_model": "NAME"}
    DIR/NAME/model.json       the model's card (optional; segapp.contract)
    DIR/NAME/N/model.tflite   version N (a positive integer): one network, model.tflite, model.keras, model.onnx
                              or a SavedModel folder model.savedmodel/

The highest version of each model is served, or those its card lists in "versions" (TF Serving's "latest" and
"specific" policies). Every worker loads every served version. A model folder with no version is `unavailable`
(the shipped `person` where `make models` could not fetch it): the server starts without it. A version that fails to
load stops a server at start (`strict`, one line naming the folder and the reason); when a running server reloads
(not strict), it is refused instead, marked `failed` with its reason, and the version served before keeps serving.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from segapp.contract import ContractError, read_card
from segapp.engines import NETWORK_FILES
from segapp.inference import Segmenter

log = logging.getLogger(__name__)

# Model names appear in URLs, headers and metric labels.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ModelLoadError(ValueError):
    """A model the server cannot start with: one line naming its folder and the reason."""


class UnknownModel(LookupError):
    """A model or version the repository does not serve; the message names what it serves."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class ModelVersion:
    """One version of a model: `ready` with its segmenter, `failed` with the reason, or `unavailable` (not served)."""

    version: str
    state: str
    reason: str | None = None
    segmenter: Segmenter | None = None

    def describe(self) -> dict:
        described = {"version": self.version, "state": self.state}
        return described | ({"reason": self.reason} if self.reason else {})


@dataclass
class Model:
    """A model of the repository and its versions, newest first."""

    name: str
    versions: list[ModelVersion] = field(default_factory=list)
    reason: str | None = None  # why none of its versions is served
    failed: bool = False  # its card or folder could not be used

    @property
    def served(self) -> list[ModelVersion]:
        return [version for version in self.versions if version.state == "ready"]

    @property
    def state(self) -> str:
        if self.served:
            return "ready"
        failed = self.failed or any(version.state == "failed" for version in self.versions)
        return "failed" if failed else "unavailable"

    def describe(self) -> dict:
        served = self.served
        described = {"name": self.name, "state": self.state}
        if self.state != "ready":
            described["reason"] = self.reason or next(v.reason for v in self.versions if v.state == "failed")
        return described | {
            "served_versions": [version.version for version in served],
            "versions": [version.describe() for version in self.versions],
            "card": served[0].segmenter.card if served else None,
        }


class ModelRepository:
    """The served models, by name; `get(name, version)` finds the segmenter that answers a request."""

    def __init__(self, models: list[Model], default_model: str):
        self.models = {model.name: model for model in models}
        self.default_model = default_model
        if default_model not in self.models or not self.models[default_model].served:
            raise ModelLoadError(f"the default model {default_model!r} is not served; models: {self.names()}")

    @classmethod
    def of(cls, segmenter: Segmenter) -> ModelRepository:
        """A repository of one loaded segmenter (SEGAPP_MODEL, and tests)."""
        name = segmenter.name or segmenter.model_path.stem
        model = Model(name, [ModelVersion(segmenter.version, "ready", segmenter=segmenter)])
        return cls([model], name)

    @classmethod
    def load(cls, folder: str | Path, default_model: str | None = None, strict: bool = True,
             served_default: str | None = None, **segmenter_options) -> ModelRepository:
        """Load every served version of every model in `folder`; `segmenter_options` go to each `Segmenter`
        (threads, max_pixels, ...). `served_default`: the default a running server has served (a reload), kept when
        nothing else names one (a second model added to a repository of one). Raises `ModelLoadError`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"model repository {folder}: not a folder")
        models = []
        for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not _NAME.fullmatch(path.name):
                raise ModelLoadError(f"model repository {folder}: {path.name!r} is not a model name "
                                     "(letters, digits, '.', '_', '-'; at most 64)")
            models.append(_load_model(path, strict, segmenter_options))
        if not models:
            raise ModelLoadError(f"model repository {folder}: no model folder in it")
        default_model = (default_model or _repository_default(folder)
                         or (models[0].name if len(models) == 1 else None) or served_default)
        if default_model is None:
            raise ModelLoadError(f"model repository {folder}: {len(models)} models and no default; name one in "
                                 "SEGAPP_DEFAULT_MODEL or repository.json's \"default_model\"")
        return cls(models, default_model)

    def names(self) -> str:
        return ", ".join(f"{name} ({'/'.join(v.version for v in model.served) or model.state})"
                         for name, model in self.models.items())

    @property
    def default(self) -> Segmenter:
        """The default model's served version (the highest, when several are)."""
        return self.models[self.default_model].served[0].segmenter

    def segmenters(self) -> list[Segmenter]:
        return [version.segmenter for model in self.models.values() for version in model.served]

    def get(self, name: str | None = None, version: str | None = None) -> Segmenter:
        """The segmenter of model `name` (default: the default model), `version` (default: its highest served).
        Raises `UnknownModel` naming what is served."""
        model = self.models.get(self.default_model if name is None else name)
        if model is None:
            raise UnknownModel(f"unknown model {name!r}; served: {self.names()}", "unknown_model")
        if not model.served:
            raise UnknownModel(f"model {name!r} is {model.state}: {model.describe()['reason']}", "model_not_ready")
        if version is None:
            return model.served[0].segmenter
        for served in model.served:
            if served.version == version:
                return served.segmenter
        raise UnknownModel(f"unknown version {version!r} of model {model.name!r}; served: "
                           f"{', '.join(v.version for v in model.served)}", "unknown_version")

    def describe(self) -> dict:
        """Every model with its state, versions and card: GET /v1/models."""
        return {"default_model": self.default_model, "models": [m.describe() for m in self.models.values()]}

    def index(self, ready_only: bool = False) -> list[dict]:
        """The Open Inference Protocol's repository index (Triton's POST /v2/repository/index): each version READY or
        UNAVAILABLE with its reason (a model with no version as one entry without a version), as Triton lists them."""
        entries = []
        for model in self.models.values():
            for version in model.versions or [ModelVersion("", "unavailable", model.reason)]:
                if ready_only and version.state != "ready":
                    continue
                entries.append({"name": model.name, **({"version": version.version} if version.version else {}),
                                "state": "READY" if version.state == "ready" else "UNAVAILABLE",
                                "reason": version.reason or ""})
        return entries


def _repository_default(folder: Path) -> str | None:
    try:
        settings = read_card(folder / "repository.json") or {}
    except ContractError as error:
        raise ModelLoadError(str(error)) from None
    default = settings.get("default_model")
    if default is not None and not isinstance(default, str):
        raise ModelLoadError(f"{folder / 'repository.json'}: default_model must be a model's name")
    return default


def _load_model(folder: Path, strict: bool, segmenter_options: dict) -> Model:
    model = Model(folder.name)
    numbered = {}
    for path in folder.iterdir():
        if path.is_dir() and path.name.isdigit() and int(path.name) > 0 and str(int(path.name)) == path.name:
            numbered[int(path.name)] = path
    try:
        card = read_card(folder / "model.json")
    except ContractError as error:
        return _failed(model, str(error), strict)
    policy = None if card is None else card.get("versions")
    if policy is not None and not (isinstance(policy, list) and policy and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in policy)):
        return _failed(model, f"{folder / 'model.json'}: 'versions' must list positive version numbers", strict)
    if card is not None and card.get("name", folder.name) != folder.name:
        return _failed(model, f"{folder / 'model.json'}: the card names the model {card['name']!r}, but its folder "
                              f"is {folder.name!r}", strict)
    if not numbered:
        model.reason = f"{folder}: no version folder ({folder}/1/model.tflite, say)"
        log.warning("model %s is not served: %s", folder.name, model.reason)
        return model
    wanted = sorted(policy or [max(numbered)], reverse=True)
    missing = [number for number in wanted if number not in numbered]
    if missing:
        return _failed(model, f"{folder / 'model.json'}: 'versions' lists {missing[0]}, which has no folder", strict)
    # Newest first. Not strict (a reload), a "latest" model whose newest version fails falls back to the next.
    candidates = wanted if policy or strict else sorted(numbered, reverse=True)
    for number in sorted(numbered, reverse=True):
        older = policy is None and any(v.state == "ready" for v in model.versions)
        if number not in candidates or older:
            reason = "not served: an older version" if policy is None else "not served: not in the card's 'versions'"
            model.versions.append(ModelVersion(str(number), "unavailable", reason))
            continue
        version = ModelVersion(str(number), "ready")
        try:
            version.segmenter = _load_version(folder, numbered[number], segmenter_options)
        except ModelLoadError as error:
            if strict:
                raise
            log.error("refused %s: %s; the model serves the versions that loaded", numbered[number], error)
            version.state, version.reason = "failed", str(error)
        model.versions.append(version)
    return model


def _load_version(folder: Path, path: Path, options: dict) -> Segmenter:
    networks = [path / name for name in NETWORK_FILES if (path / name).exists()]
    if len(networks) != 1:
        found = ", ".join(n.name for n in networks) or "none"
        raise ModelLoadError(f"{path}: a version folder holds one network ({', '.join(NETWORK_FILES)}); found {found}")
    try:
        return Segmenter(networks[0], card_file=folder / "model.json", name=folder.name, version=path.name,
                         **options).load()
    except ContractError as error:
        raise ModelLoadError(str(error)) from None
    except Exception as error:  # the runtimes raise their own kinds for a broken file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(f"{networks[0]}: cannot be loaded: {reason}") from None


def _failed(model: Model, reason: str, strict: bool) -> Model:
    if strict:
        raise ModelLoadError(reason)
    log.error("refused model %s: %s", model.name, reason)
    model.reason, model.failed = reason, True
    return model
