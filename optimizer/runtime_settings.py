"""The engine's settings layers: the base (file < environment < flags) and the runtime layer on top of it.

The runtime layer holds the keys pinned through the admin API (``PATCH /admin/config``, ``import-config``,
``DELETE /admin/config``) and is persisted. Pure: each function takes the layers as they are and returns the
new runtime layer (or raises :class:`ConfigError`, changing nothing); :func:`compare` says what the new layer
did. :class:`SettingsLayers` holds the layers; the engine keeps one and acts on each change
(:class:`optimizer.engine.Engine`: a new revision, optimization turned on or off).
"""

from __future__ import annotations

import dataclasses
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


class SettingsLayers:
    """The base settings, the runtime layer over them, and the effective settings (the two applied).

    Every change is all-or-nothing: it raises :class:`ConfigError` before anything moves.
    """

    def __init__(self, base: Settings) -> None:
        self.base = base  # file < environment < flags (and a simulated scenario's profiles)
        self.runtime: dict[str, Any] = {}  # set through the admin API, by key, JSON-ready; persisted
        self.settings = base  # the base with the runtime layer applied

    def set(self, updates: Mapping[str, Any]) -> SettingsChange:
        """Pin ``updates`` (:func:`set_layer`)."""
        layer, unchanged = set_layer(self.settings, self.runtime, updates)
        return dataclasses.replace(self.install(layer), unchanged=unchanged)

    def replace(self, layer: Mapping[str, Any]) -> SettingsChange:
        """Make ``layer`` the whole runtime layer (:func:`replace_layer`)."""
        return self.install(replace_layer(self.base, layer))

    def reset(self, keys: Collection[str] | None) -> SettingsChange:
        """Unpin ``keys`` (:func:`reset_layer`; ``None``: every key)."""
        return self.install(reset_layer(self.runtime, keys))

    def restore(self, saved: Mapping[str, Any]) -> dict[str, str]:
        """Re-apply a saved layer (:func:`restore_layer`); returns the keys skipped and why."""
        layer, skipped = restore_layer(self.base, saved)
        self.runtime, self.settings = layer, apply_settings(self.base, layer)
        return skipped

    def install(self, layer: Mapping[str, Any]) -> SettingsChange:
        """Make ``layer`` the runtime layer; what it changed."""
        new = apply_settings(self.base, layer)
        change = compare(self.settings, new, self.runtime, layer)
        self.runtime, self.settings = dict(layer), new
        return change
