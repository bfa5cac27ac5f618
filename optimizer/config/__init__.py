"""Settings, their validation and their layering (file < environment < CLI).

``settings.py`` holds the policy and server settings and their checks, ``kube.py`` the Kubernetes
settings (the ``kubernetes:`` section), ``load.py`` the layering (defaults < file < environment < flags). A bad value of either is a :class:`ConfigError`, which is
:class:`optimizer.fields.FieldError`, the one "bad field" error (its checks are in ``optimizer.fields``).
Everything is importable from ``optimizer.config``, as before it was a package.
"""

from optimizer.config.kube import KubeSettingError, KubeSettings
from optimizer.config.load import env_overrides, load_config, load_file
from optimizer.config.settings import (
    DEFAULT_BATCH_SIZE,
    ENV_PREFIX,
    FILE_ONLY_KEYS,
    PROFILE_CACHE,
    RUNTIME_KEYS,
    SERVER_KEYS,
    SETTING_KEYS,
    BackendName,
    Config,
    ConfigError,
    ServerSettings,
    ServiceProfile,
    Settings,
    Strategy,
    apply_server,
    apply_settings,
    settings_to_dict,
    validate_settings,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "ENV_PREFIX", "FILE_ONLY_KEYS", "PROFILE_CACHE", "RUNTIME_KEYS", "SERVER_KEYS",
    "SETTING_KEYS", "BackendName", "Config", "ConfigError", "KubeSettingError", "KubeSettings", "ServerSettings",
    "ServiceProfile", "Settings", "Strategy", "apply_server", "apply_settings", "env_overrides", "load_config",
    "load_file", "settings_to_dict", "validate_settings",
]
