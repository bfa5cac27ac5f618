"""OOM doubles shared by the tests of the client against the server (a copy of client/tests/test_client_oom.py's:
the client's tests import nothing of this directory)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import cast

from tests.tools import in_ci

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB"


class OutOfMemoryError(RuntimeError):
    """What the library sees of ``torch.cuda.OutOfMemoryError`` when PyTorch is not installed."""


def _oom_class() -> type[Exception]:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        if in_ci():  # make test installs PyTorch (the dev extras): without it these tests test less
            raise
        return OutOfMemoryError
    return cast(type[Exception], torch.cuda.OutOfMemoryError)


OOM_ERROR = _oom_class()


def oom(note: str = "") -> Exception:
    return OOM_ERROR(OOM_TEXT + note)


@dataclass
class FakeReporter:
    """Records what recovery reports."""

    calls: list[tuple[int, bool]] = field(default_factory=list)

    def report(self, batch_size: int, *, oom: bool = False) -> None:
        self.calls.append((batch_size, oom))
