"""segapp/openapi.yaml: valid OpenAPI 3.1, describing exactly the app's routes and methods, served at /openapi.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import schemathesis
import yaml

from segapp.app import SegmentationApp
from segapp.config import Settings
from segapp.openapi import load_description
from segapp.repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent

METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
# A value for each path parameter, to turn a described template into a path the app routes.
SAMPLE_PARAMETERS = {"name": "segapp-unet", "version": "1"}


@pytest.fixture(scope="module")
def description() -> dict:
    return load_description()


def described_routes(description: dict) -> dict[str, set[str]]:
    """Path template -> its methods, upper case, as the description says."""
    return {
        template: {method.upper() for method in item if method in METHODS}
        for template, item in description["paths"].items()
    }


def app_routes(app: SegmentationApp) -> dict[str, set[str]]:
    """Path template -> methods, as the app routes them: its exact paths, and each pattern's template, also with
    `/versions/{version}` after `{name}` when the pattern takes a version."""
    routes = {path: set(allowed) for path, (_, allowed) in app.routes.items()}
    for pattern, template, _, allowed in app.patterns:
        routes[template] = set(allowed)
        if "version" in pattern.groupindex:
            routes[template.replace("{name}", "{name}/versions/{version}", 1)] = set(allowed)
    return routes


def test_description_is_valid_openapi_3_1(description):
    assert re.fullmatch(r"3\.1\.\d+", description["openapi"])
    schemathesis.openapi.from_dict(description).validate()  # raises with the first violation of the 3.1 schema


def test_an_invalid_description_is_refused_by_the_validator(description):
    broken = load_description()
    broken["paths"]["/healthz"]["get"]["responses"]["200"]["content"] = "application/json"
    with pytest.raises(ValueError, match="content"):
        schemathesis.openapi.from_dict(broken).validate()


def test_described_routes_and_methods_are_exactly_the_apps(description, fake_segmenter):
    app = SegmentationApp(Settings(), ModelRepository.of(fake_segmenter), metrics=None)
    assert described_routes(description) == app_routes(app)


def test_every_described_path_reaches_the_endpoint_the_app_routes_it_to(description, fake_segmenter):
    app = SegmentationApp(Settings(), ModelRepository.of(fake_segmenter), metrics=None)
    for template, methods in described_routes(description).items():
        path = template.format(**SAMPLE_PARAMETERS)
        endpoint, _, allowed, parameters = app.route(path)
        assert endpoint is not None, f"{template} ({path}) reaches no endpoint"
        assert set(allowed) == methods, template
        assert {key for key, value in parameters.items() if value is not None} == set(
            re.findall(r"{(\w+)}", template)
        ), template


def test_every_operation_documents_the_errors_nginx_can_answer(description):
    for template, item in description["paths"].items():
        for method in set(item) & set(METHODS):
            statuses = set(item[method]["responses"])
            missing = {"400", "413", "414", "429", "500", "502", "503", "504"} - statuses
            assert not missing, f"{method.upper()} {template} does not document {sorted(missing)}"


def test_openapi_json_serves_the_yaml_as_json(app_for, fake_segmenter, description):
    response = app_for(fake_segmenter).get("/openapi.json")
    assert response.content_type == "application/json"
    assert response.json == description
    assert "total;dur=" in response.headers["Server-Timing"]


def test_openapi_json_names_the_configured_inference_route(app_for, fake_segmenter):
    served = app_for(fake_segmenter, Settings(route="/segment")).get("/openapi.json").json
    assert "/segment" in served["paths"] and "/infer" not in served["paths"]
    assert served["paths"]["/segment"]["post"]["operationId"] == "infer"
    assert list(served["paths"]) == [
        "/segment" if template == "/infer" else template for template in load_description()["paths"]
    ]


def test_openapi_json_answers_head_and_refuses_post(app_for, fake_segmenter):
    app = app_for(fake_segmenter)
    head = app.head("/openapi.json")
    assert head.status_int == 200 and head.body == b""
    refused = app.post("/openapi.json", b"", status=405)
    assert refused.headers["Allow"] == "GET, HEAD"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """segapp's wheel, built from a copy of the source as the image builds it (deploy/build-image); the copy is gone
    once it is built, so nothing of a checkout is left to read from."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    shutil.copytree(ROOT / "segapp", source / "segapp", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(folder / "wheels"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.rmtree(source)
    (built_wheel,) = (folder / "wheels").glob("segapp-*.whl")
    return built_wheel


def served_from(installed: Path, cwd: Path) -> tuple[Path, dict]:
    """(segapp.openapi's file, the description it serves) in a fresh interpreter importing segapp from `installed`."""
    served = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import json, segapp.openapi as o; "
         "print(o.__file__); print(o.description_json().decode())", str(installed)],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    module, description = served.stdout.splitlines()
    return Path(module), json.loads(description)


def packaged_description(wheel: Path) -> dict:
    """The description the wheel installs: its resource segapp/openapi.yaml."""
    with zipfile.ZipFile(wheel) as archive:
        return yaml.safe_load(archive.read("segapp/openapi.yaml").decode("utf-8"))


def test_the_wheel_carries_the_description_and_serves_it_installed(wheel, tmp_path):
    """The image installs segapp from its wheel (deploy/build-image): the description must be in it, and an installed
    segapp, away from any checkout, must serve it; on 723bb99 it sat in docs/ and the image answered 500."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "installed")
    module, served = served_from(tmp_path / "installed", tmp_path)
    assert module.is_relative_to(tmp_path / "installed")
    assert served == packaged_description(wheel) == load_description()


def test_the_description_is_read_as_a_package_resource_even_from_a_zipped_install(wheel, tmp_path):
    """Served from the installed package's resource (importlib.resources), not from a file path beside the module: a
    package imported from a zip archive has no such path, and reading one there fails."""
    module, served = served_from(wheel, tmp_path)
    assert module.is_relative_to(wheel)
    assert served == packaged_description(wheel)
