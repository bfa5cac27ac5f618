"""Who may use the admin API: the bearer token, the file a generated token is kept in, and the Host names
the admin API answers for. Shared by ``serve`` (which generates and writes the token) and the management
commands (which read it back); standard library only, so the management commands stay light.

Without a configured token ``serve`` generates one at start and writes it, readable by its own user only,
to :func:`generated_token_path`; the management commands read it from the same place when they are given
no token and talk to a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

#: What a token may hold: what an HTTP header carries unchanged and a shell or a file keeps intact.
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,1024}")
TOKEN_RULE = "1-1024 printable ASCII characters, without spaces"
TOKEN_DIR = "vlm-gpu-optimizer"
#: Host names that always mean this machine: a DNS-rebinding page cannot make a browser send them.
LOOPBACK_NAMES = frozenset({"localhost"})

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class AccessError(Exception):
    """The token or its file cannot be used; the message is one line for the operator."""


def new_token() -> str:
    """A random bearer token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_name(admin_port: int) -> str:
    """The generated token's file name: one per admin port, so two local servers keep theirs apart."""
    return f"admin-token-{admin_port}"


def generated_token_path(admin_port: int, state_path: str | None, environ: Mapping[str, str]) -> Path:
    """Where a generated token is kept, in this order:

    1. next to the state file, when there is one (``--state-path``; in Kubernetes on the node's volume);
    2. ``$XDG_RUNTIME_DIR/vlm-gpu-optimizer/``, when that variable names an existing directory;
    3. ``${TMPDIR:-/tmp}/vlm-gpu-optimizer-<uid>/``.

    The file is ``admin-token-<admin port>``. ``serve`` and the management commands compute the same path
    from the same inputs (the commands take the state path from ``VLM_OPTIMIZER_STATE_PATH``).
    """
    name = token_name(admin_port)
    if state_path:
        return Path(state_path).absolute().parent / name
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / TOKEN_DIR / name
    tmp = environ.get("TMPDIR", "")
    return Path(tmp if os.path.isabs(tmp) else "/tmp") / f"{TOKEN_DIR}-{os.geteuid()}" / name


def check_private_dir(directory: Path) -> None:
    """Raise :class:`AccessError` unless ``directory`` is a directory of this user that no other user can
    write (so nobody else can replace or remove a file in it). One that does not exist raises
    ``FileNotFoundError``."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AccessError(f"cannot use {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AccessError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise AccessError(f"{directory} belongs to another user (uid {st.st_uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise AccessError(f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")


class GeneratedToken:
    """A token made at start, and its file: :meth:`prepare` writes it to a private temporary file (the
    parts that can fail, before the server starts), :meth:`publish` renames it into place once the admin
    API listens (a second server that fails to bind the same port leaves the first one's file alone), and
    :meth:`discard` removes it at exit when it still holds this token.
    """

    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self.token = token or new_token()
        self._tmp: Path | None = None

    def prepare(self) -> None:
        """Create the directory (0700) if needed, check that it is private, and write the token to a new
        temporary file in it, created 0600 with ``O_EXCL``. Raises :class:`AccessError`."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AccessError(f"cannot create {directory}: {exc.strerror or exc}") from None
        try:
            check_private_dir(directory)
        except FileNotFoundError:
            raise AccessError(f"{directory} disappeared") from None
        tmp = directory / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise AccessError(f"cannot write a token file in {directory}: {exc.strerror or exc}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (self.token + "\n").encode("ascii"))
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise AccessError(f"cannot write {tmp}: {exc.strerror or exc}") from None
        os.close(fd)
        self._tmp = tmp

    def publish(self) -> None:
        """Move the prepared file to :attr:`path` (atomically; replaces a stale token). Raises ``OSError``."""
        assert self._tmp is not None, "prepare() first"
        os.replace(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        """Remove the temporary file, and the token file if it still holds this token (never another's)."""
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        try:
            if self.path.read_text(encoding="ascii").strip() == self.token:
                self.path.unlink()
        except (OSError, UnicodeDecodeError):
            pass


def read_token_file(path: Path) -> str:
    """The token a file holds (its text, stripped). Raises ``OSError`` and :class:`AccessError`."""
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AccessError(f"{path} is not UTF-8 text") from None
    if not text:
        raise AccessError(f"{path} is empty")
    if not TOKEN_RE.fullmatch(text):
        raise AccessError(f"the token in {path} must be {TOKEN_RULE}")
    return text


def parse_host_name(value: str) -> str | None:
    """The host part of a ``Host`` header or an allowed-host entry, normalised (lower case, no trailing dot,
    IP addresses in their canonical form, IPv6 without brackets); ``None`` when it is neither a host name
    nor an IP address (either may carry a ``:port``, which is dropped)."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not _port_ok(text[end + 1:]):
            return None
        ip = _ip(text[1:end])
        return str(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if text.count(":") > 1:  # a bare IPv6 address, as an allowed-host entry may be written
        ip = _ip(text)
        return str(ip) if ip is not None else None
    host, colon, port = text.partition(":")
    if colon and not _port_ok(colon + port):
        return None
    host = host.removesuffix(".")
    ip = _ip(host)
    if ip is not None:
        return str(ip)
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return host


def _port_ok(rest: str) -> bool:
    return rest == "" or (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def same_host(name: str, other: str) -> bool:
    """Whether two normalised host names are the same (IP addresses compared as addresses)."""
    a, b = _ip(name), _ip(other)
    if a is not None and b is not None:
        return _unmapped(a) == _unmapped(b)
    return name == other


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    ip = _ip(name)
    return name in LOOPBACK_NAMES if ip is None else _unmapped(ip).is_loopback


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_unspecified(name: str) -> bool:
    """A wildcard bind address (0.0.0.0, ::): no client names it."""
    ip = _ip(name)
    return ip is not None and ip.is_unspecified
