"""segapp.config: settings from SEGAPP_* variables, their defaults, and start-up failures that name the variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from segapp.config import Settings, SettingsError
from segapp.inference import SHIPPED_MODEL, SHIPPED_REPOSITORY


def test_defaults_without_variables():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.model is None and settings.model_repository == SHIPPED_REPOSITORY and SHIPPED_MODEL.exists()
    assert (settings.threads, settings.route) == (1, "/infer")
    assert (settings.default_format, settings.log_level) == ("png", "INFO")
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.max_pixels == 40_000_000
    assert settings.engine_delay_ms == 0
    assert settings.drain_file is None


def test_variables_override_defaults():
    settings = Settings.from_env({
        "SEGAPP_MODEL": "/srv/models/pets.tflite",
        "SEGAPP_THREADS": " 4 ",
        "SEGAPP_ROUTE": "/v1/segment",
        "SEGAPP_MAX_BODY_BYTES": "1_000_000",
        "SEGAPP_MAX_PIXELS": "2000000",
        "SEGAPP_DEFAULT_FORMAT": "json",
        "SEGAPP_LOG_LEVEL": "debug",
        "SEGAPP_ENGINE_DELAY_MS": "250",
        "SEGAPP_DRAIN_FILE": "/run/segapp/draining",
        "OTHER_VARIABLE": "ignored",
    })
    assert settings.model == Path("/srv/models/pets.tflite")
    assert settings.threads == 4
    assert settings.route == "/v1/segment"
    assert settings.max_body_bytes == 1_000_000
    assert settings.max_pixels == 2_000_000
    assert settings.default_format == "json"
    assert settings.log_level == "DEBUG"
    assert settings.engine_delay_ms == 250
    assert settings.drain_file == Path("/run/segapp/draining")


def test_empty_variable_keeps_the_default():
    assert Settings.from_env({"SEGAPP_THREADS": "", "SEGAPP_ROUTE": ""}) == Settings()


@pytest.mark.parametrize("variable, value", [
    ("SEGAPP_THREADS", "two"),
    ("SEGAPP_THREADS", "0"),
    ("SEGAPP_MAX_BODY_BYTES", "-1"),
    ("SEGAPP_MAX_PIXELS", "lots"),
    ("SEGAPP_MAX_PIXELS", "100000000"),  # over Pillow's guard, which would refuse such images anyway
    ("SEGAPP_DEFAULT_FORMAT", "bmp"),
    ("SEGAPP_LOG_LEVEL", "LOUD"),
    ("SEGAPP_ROUTE", "infer"),
    ("SEGAPP_ROUTE", "/healthz"),
    ("SEGAPP_ROUTE", "/openapi.json"),
    ("SEGAPP_ROUTE", "/v2/models/x/infer"),
    ("SEGAPP_ROUTE", "/"),
    ("SEGAPP_ENGINE_DELAY_MS", "-5"),
])
def test_invalid_value_fails_naming_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().threads = 8  # type: ignore[misc]
