"""optimizer.fields: the one way to check a field, and the one "bad field" error (config, kube settings, API)."""

from __future__ import annotations

import enum
import re
from typing import Any

import pytest

from optimizer import fields
from optimizer.api.schemas import InvalidInput, parse_report
from optimizer.config import ConfigError, KubeSettingError, KubeSettings, Settings, apply_settings
from optimizer.config.kube import apply_kube
from optimizer.fields import FieldError


def test_one_error_type_under_the_names_callers_know() -> None:
    assert ConfigError is FieldError and InvalidInput is FieldError and KubeSettingError is FieldError
    for raise_it in (lambda: apply_settings(Settings(), {"max_batch_size": 0}),
                     lambda: apply_kube(KubeSettings(), {"watch_timeout": "5"}),
                     lambda: parse_report({"service": "a", "batch_size": 0})):
        with pytest.raises(FieldError) as info:
            raise_it()
        assert info.value.allowed and info.value.message in str(info.value)


def test_the_error_names_the_field_and_what_it_allows() -> None:
    with pytest.raises(FieldError) as info:
        fields.as_int("server.port", "http", 0, 65535)
    err = info.value
    assert (err.name, err.key, err.kind, err.allowed) == ("server.port", "server.port", "field",
                                                          "an integer in [0, 65535]")
    assert str(err) == "server.port: must be an integer in [0, 65535], got 'http'"
    assert err.body() == {"error": str(err), "field": "server.port"}
    as_parameter = FieldError("limit", "must be an integer in [1, 10]", kind="parameter")
    assert as_parameter.body() == {"error": "limit: must be an integer in [1, 10]", "parameter": "limit"}


@pytest.mark.parametrize(("value", "text", "expected"), [
    (8, True, 8), ("8", True, 8), (8.0, True, 8), (" 8 ", True, 8),
    (8, False, 8), ("8", False, None), (8.0, False, None), (True, True, None), (8.5, True, None), (0, True, None),
])
def test_as_int(value: Any, text: bool, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(FieldError, match=r"must be an integer in \[1, 10\]"):
            fields.as_int("n", value, 1, 10, text=text)
    else:
        assert fields.as_int("n", value, 1, 10, text=text) == expected


@pytest.mark.parametrize(("value", "text", "message"), [
    ("x", True, "must be a number, got 'x'"), (True, True, "must be a number, got True"),
    ("0.5", False, "must be a number, got '0.5'"), (0, True, r"must be in \(0, 1\], got 0"),
    (float("inf"), True, r"must be in \(0, 1\]"), ("nan", True, r"must be in \(0, 1\]"),
])
def test_as_float_refuses(value: Any, text: bool, message: str) -> None:
    with pytest.raises(FieldError, match=message) as info:
        fields.as_float("f", value, 0.0, 1.0, lo_open=True, text=text)
    assert info.value.allowed == "a number in (0, 1]"


def test_as_float_takes() -> None:
    assert fields.as_float("f", "0.5", 0.0, 1.0) == 0.5 and fields.as_float("f", 1, 0.0, 1.0) == 1.0
    assert fields.as_float("f", 0, 0.0, 1.0) == 0.0


def test_bool_choice_enum() -> None:
    assert fields.as_bool("b", "Yes") is True and fields.as_bool("b", False, text=False) is False
    with pytest.raises(FieldError, match="must be true or false, got 'yes'"):
        fields.as_bool("b", "yes", text=False)

    class Colour(str, enum.Enum):
        RED = "red"
        BLUE = "blue"

    assert fields.as_enum("c", " RED ", Colour) is Colour.RED and fields.as_enum("c", Colour.BLUE, Colour) is Colour.BLUE
    with pytest.raises(FieldError, match="must be one of red, blue, got 'green'") as info:
        fields.as_enum("c", "green", Colour)
    assert info.value.allowed == "one of red, blue"
    assert fields.as_choice("l", "JSON", ("auto", "json")) == "json"


def test_names_service_and_unknown_keys() -> None:
    ns = re.compile(r"[a-z0-9-]+")
    assert fields.as_names("ns", "a, b,a,", ns, "lower-case", what="namespace") == ("a", "b")
    assert fields.as_names("ns", ["x"], ns, "lower-case", what="namespace") == ("x",)
    with pytest.raises(FieldError, match="'B_' is not a namespace name"):
        fields.as_names("ns", "B_", ns, "lower-case", what="namespace")
    with pytest.raises(FieldError, match="must be a list of namespaces"):
        fields.as_names("ns", 3, ns, "lower-case", what="namespace")
    assert fields.as_service("service", "vlm-a") == "vlm-a"
    with pytest.raises(FieldError, match="is required"):
        fields.as_service("service", "", kind="parameter")
    err = fields.unknown_key("colour", ("a", "b"), noun="field")
    assert str(err) == "colour: unknown field; allowed fields are a, b" and err.allowed == "a, b"
