"""The engine's settings layers: the base (file < environment < flags) and the runtime layer on top of it.

The runtime layer holds the keys pinned through the admin API (``PATCH /admin/config``, ``import-config``,
``DELETE /admin/config``) and is persisted. Pure: each function takes the layers as they are and returns the
new runtime layer (or raises :class:`ConfigError`, changing nothing); :func:`compare` says what the new layer
did. The engine installs the result and acts on it (:class:`optimizer.engine.Engine`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.config import (
    FILE_ONLY_KEYS,
    RUNTIME_KEYS,
    SETTING_KEYS,
    ConfigError,
    Settings,
    apply_settings,
    settings_to_dict,
)


@dataclass(frozen=True)
class SettingsChange:
    """What a change of the runtime layer did.

    ``changed``: the effective values that moved, {key: (old, new)}. ``pinned``: keys the runtime layer
    gained or whose pinned value moved. ``unpinned``: keys it lost (now at their base value).
    ``unchanged``: keys a :meth:`Engine.set_runtime` named that already had the value (not pinned).
    """

    changed: dict[str, tuple[Any, Any]]
    pinned: tuple[str, ...] = ()
    unpinned: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


def refuse_file_only(keys: Collection[str]) -> None:
    """Raise :class:`ConfigError` if ``keys`` names a key set only in the config file (profiles)."""
    for key in FILE_ONLY_KEYS:
        if key in keys:
            raise ConfigError(key, "profiles are set only in the config file (--config), not at runtime: "
                                   "change the file and restart")


def set_layer(settings: Settings, runtime: Mapping[str, Any],
              updates: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The runtime layer with ``updates`` pinned, and the keys of ``updates`` that already had their value.

    Only a key whose value differs from the effective one (``settings``) is pinned.
    """
    refuse_file_only(updates)
    current = settings_to_dict(settings)
    wanted = settings_to_dict(apply_settings(settings, updates))
    differ = [k for k in updates if wanted[k] != current[k]]
    return {**runtime, **{k: wanted[k] for k in differ}}, tuple(sorted(k for k in updates if k not in differ))


def replace_layer(base: Settings, layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` as a whole runtime layer over ``base``, its values normalised (JSON-ready)."""
    refuse_file_only(layer)
    values = settings_to_dict(apply_settings(base, layer))
    return {k: values[k] for k in layer}


def reset_layer(runtime: Mapping[str, Any], keys: Collection[str] | None) -> dict[str, Any]:
    """The runtime layer without ``keys`` (``None``: every key). Raises for a key that is not a runtime setting."""
    if keys is not None:
        for key in keys:
            if key not in RUNTIME_KEYS:
                why = ("profiles are set only in the config file and are never pinned" if key in FILE_ONLY_KEYS
                       else "not a setting")
                raise ConfigError("keys", f"{key!r}: {why}; allowed keys are {', '.join(RUNTIME_KEYS)}")
    gone = set(runtime) if keys is None else set(keys)
    return {k: v for k, v in runtime.items() if k not in gone}


def restore_layer(base: Settings, saved: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A saved runtime layer re-applied over ``base`` key by key: the layer kept, and the keys skipped with why.

    A key that is no longer valid (unknown, a bad value, a file-only key, or one that no longer fits the
    base's other settings) is skipped; the others are kept.
    """
    skipped = {k: "profiles are set only in the config file" for k in saved if k in FILE_ONLY_KEYS}
    pending = {k: v for k, v in saved.items() if k not in FILE_ONLY_KEYS}
    layer: dict[str, Any] = {}
    errors: dict[str, str] = {}
    progress = True
    while pending and progress:  # a key may fit only once another is back (a pinned min under a pinned max)
        progress = False
        for key, value in list(pending.items()):
            try:
                values = settings_to_dict(apply_settings(base, {**layer, key: value}))
            except ConfigError as exc:
                errors[key] = str(exc)
                continue
            layer[key] = values[key]
            del pending[key]
            progress = True
    skipped.update({k: errors[k] for k in pending})
    return layer, skipped


def compare(old: Settings, new: Settings, old_layer: Mapping[str, Any], layer: Mapping[str, Any]) -> SettingsChange:
    """What replacing ``old_layer`` (effective settings ``old``) by ``layer`` (``new``) changed."""
    before, after = settings_to_dict(old), settings_to_dict(new)
    changed = {k: (before[k], after[k]) for k in SETTING_KEYS if before[k] != after[k]}
    pinned = tuple(sorted(k for k in layer if k not in old_layer or old_layer[k] != layer[k]))
    unpinned = tuple(sorted(k for k in old_layer if k not in layer))
    return SettingsChange(changed=changed, pinned=pinned, unpinned=unpinned)
