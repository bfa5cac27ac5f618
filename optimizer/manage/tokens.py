"""The admin token a management command sends: ``--token``, ``--token-file``, ``VLM_OPTIMIZER_ADMIN_TOKEN``,
else the one a local ``serve`` generated (:func:`generated_token`); :mod:`optimizer.manage.commands` uses it."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from optimizer.admin_access import (
    TOKEN_RE,
    TOKEN_RULE,
    AccessError,
    check_private_dir,
    generated_token_path,
    is_loopback_name,
    parse_host_name,
    read_token_file,
)
from optimizer.manage.client import STATE_PATH_ENV, TOKEN_ENV, UsageError


def resolve_token(token: str | None, token_file: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--token``, else the first line of ``--token-file``, else ``VLM_OPTIMIZER_ADMIN_TOKEN``; ``None``
    when none is set. Raises :class:`UsageError` for an unreadable or empty token file, and for a token
    that is not 1-1024 printable ASCII characters without spaces."""
    if token is not None and token_file is not None:
        raise UsageError("give --token or --token-file, not both")
    if token is not None:
        token = token.strip()
        if not token:
            raise UsageError("--token is empty")
        return _checked(token, "--token")
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --token-file {token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not text:
            raise UsageError(f"--token-file {token_file} is empty")
        return _checked(text, f"the token in --token-file {token_file}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return _checked(value, f"${TOKEN_ENV}") if value else None


def _checked(token: str, what: str) -> str:
    if not TOKEN_RE.fullmatch(token):
        raise UsageError(f"{what} must be {TOKEN_RULE}")
    return token


def generated_token(url: str, environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """The token a ``serve`` on this machine generated, for a loopback ``url`` (never sent elsewhere):
    ``(token, note)``, the note saying where it was read or looked for. The file is where ``serve`` puts
    it (:func:`optimizer.admin_access.generated_token_path`) for the URL's port, with the state path taken
    from ``VLM_OPTIMIZER_STATE_PATH``; it is read only from a directory of this user that nobody else can
    write. ``(None, None)`` for a URL that is not loopback.
    """
    env = os.environ if environ is None else environ
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None, None
    name = parse_host_name(parts.hostname or "")
    if name is None or not is_loopback_name(name):
        return None, None
    path = generated_token_path(port, env.get(STATE_PATH_ENV) or None, env)
    try:
        check_private_dir(path.parent)
        token = read_token_file(path)
    except FileNotFoundError:
        return None, f"no generated token at {path}"
    except OSError as exc:
        return None, f"cannot read the generated token at {path}: {exc.strerror or exc}"
    except AccessError as exc:
        return None, f"not using the generated token at {path}: {exc}"
    return token, f"the token was read from {path}, written by the serve started without a token"
