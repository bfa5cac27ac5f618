"""The management commands: steer a running optimizer through its admin API (default port 8081).

The seed's ``manage_vlm_gpu_memory.py`` commands (``status``, ``monitor``, ``optimize``,
``set-batch-size``, ``enable``/``disable``, ``start-monitoring``/``stop-monitoring``, ``configure``,
``export-config``/``import-config``), as HTTP calls to the service. HTTP uses only the standard
library (:mod:`urllib.request`), so these commands run no event loop.

Every failure is raised as a :class:`ManageError` whose ``exit_code`` says what went wrong
(:data:`EXIT_SERVICE`, :data:`EXIT_USAGE`, :data:`EXIT_AUTH`, :data:`EXIT_UNREACHABLE`);
:func:`run` turns it into one line on stderr and that exit code.
"""

from __future__ import annotations

from optimizer.manage.client import (
    AdminClient,
    AuthError,
    CONFIGURE_FLAGS,
    DEFAULT_SERVICE,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    EXIT_AUTH,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVICE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ManageError,
    PROG,
    STATE_PATH_ENV,
    ServiceError,
    TOKEN_ENV,
    URL_ENV,
    Unreachable,
    UsageError,
)
from optimizer.manage.commands import (
    CLEAR_SCREEN,
    COMMANDS,
    client_from_args,
    cmd_configure,
    cmd_enable,
    cmd_export_config,
    cmd_import_config,
    cmd_monitor,
    cmd_monitoring,
    cmd_optimize,
    cmd_set_batch_size,
    cmd_status,
    parse_gpu_selector,
    read_config_document,
    run,
)
from optimizer.manage.tokens import generated_token, resolve_token

__all__ = [
    "AdminClient",
    "AuthError",
    "CLEAR_SCREEN",
    "COMMANDS",
    "CONFIGURE_FLAGS",
    "DEFAULT_SERVICE",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "EXIT_AUTH",
    "EXIT_CODES_HELP",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SERVICE",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ManageError",
    "PROG",
    "STATE_PATH_ENV",
    "ServiceError",
    "TOKEN_ENV",
    "URL_ENV",
    "Unreachable",
    "UsageError",
    "client_from_args",
    "cmd_configure",
    "cmd_enable",
    "cmd_export_config",
    "cmd_import_config",
    "cmd_monitor",
    "cmd_monitoring",
    "cmd_optimize",
    "cmd_set_batch_size",
    "cmd_status",
    "generated_token",
    "parse_gpu_selector",
    "read_config_document",
    "resolve_token",
    "run",
]
