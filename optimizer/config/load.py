"""The layering of the settings: built-in defaults < a YAML file (``--config``) < environment variables
(``VLM_OPTIMIZER_<KEY>``, ``VLM_OPTIMIZER_KUBE_<KEY>``) < command-line flags.

Each layer is checked as it is applied (``optimizer/config/settings.py``, ``optimizer/config/kube.py``); a
bad value is a :class:`~optimizer.config.ConfigError` naming the key, and nothing is applied.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from optimizer.config.kube import KubeSettings, apply_kube, finish, kube_env
from optimizer.config.settings import (
    ENV_PREFIX,
    SERVER_KEYS,
    SETTING_KEYS,
    Config,
    ConfigError,
    ServerSettings,
    Settings,
    coerce_setting,
    apply_server,
    validate_settings,
)


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML config file; returns (policy settings, server settings) as raw mappings.

    The ``kubernetes:`` section, if any, is returned inside the server mapping under ``kubernetes``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{p} is not UTF-8 text: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{p} is not valid YAML: {exc}") from exc
    except RecursionError:  # the YAML parser recurses once per level of nesting
        raise ConfigError("config", f"{p} is nested too deeply to be a configuration") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping at its top level")
    server = data.pop("server", None)
    if server is None:
        server = {}
    if not isinstance(server, dict):
        raise ConfigError("server", "must be a mapping")
    kube = data.pop("kubernetes", None)
    if kube is not None:
        if not isinstance(kube, dict):
            raise ConfigError("kubernetes", "must be a mapping")
        server = {**server, "kubernetes": kube}
    return data, server


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``VLM_OPTIMIZER_<KEY>`` for every scalar policy and server key."""
    settings: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for key in SETTING_KEYS:
        if key in ("profiles", "default_profile"):
            continue
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None:
            settings[key] = value
    for key in SERVER_KEYS:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None:
            server[key] = value
    return settings, server


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cli_settings: Mapping[str, Any] | None = None,
    cli_server: Mapping[str, Any] | None = None,
    cli_kube: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration: defaults < file < environment < CLI flags."""
    file_settings, file_server = load_file(path) if path is not None else ({}, {})
    file_kube = file_server.pop("kubernetes", {})
    env = os.environ if environ is None else environ
    env_settings, env_server = env_overrides(env)
    merged: dict[str, Any] = {}
    for layer in (file_settings, env_settings, dict(cli_settings or {})):
        merged.update((k, coerce_setting(k, v)) for k, v in layer.items())
    settings = validate_settings(dataclasses.replace(Settings(), **merged))  # relations: on the merged result
    server = ServerSettings()
    for slayer in (file_server, env_server, dict(cli_server or {})):
        server = apply_server(server, slayer)
    kube = KubeSettings()
    for klayer in (file_kube, kube_env(env, ENV_PREFIX), dict(cli_kube or {})):
        kube = apply_kube(kube, klayer)
    kube = finish(kube)
    return Config(settings=settings, server=server, kube=kube)
