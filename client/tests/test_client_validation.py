"""One way to check an argument in the client, one error: every module refuses a bad argument with
:class:`vlm_optimizer_client.InvalidArgument` naming it, saying what is allowed and showing the value."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vlm_optimizer_client as c
from vlm_optimizer_client import InvalidArgument

PACKAGE = Path(c.__file__).resolve().parent


def _bad_fn() -> None:
    pass


CASES: dict[str, tuple[Callable[[], object], str, str]] = {
    # follow
    "follower service": (lambda: c.BatchSizeClient("bad name"), "service", "1-128 characters"),
    "follower interval": (lambda: c.BatchSizeClient("svc", interval=0), "interval", "seconds > 0"),
    "follower gpu": (lambda: c.AsyncBatchSizeClient("svc", gpu="gpu0"), "gpu", "a GPU index"),
    "follower url": (lambda: c.BatchSizeClient("svc", url="ftp://x"), "url", "http:// or https://"),
    "follower safe batch": (lambda: c.BatchSizeClient("svc", safe_batch_size=0), "safe_batch_size", "integer >= 1"),
    # reporting: the same rules as the follower (the server's), not a looser copy
    "reporter service": (lambda: c.Reporter("bad name"), "service", "1-128 characters"),
    "reporter gpu": (lambda: c.AsyncReporter("svc", gpu=True), "gpu", "a GPU index"),
    "reporter url": (lambda: c.Reporter("svc", url="http://x/?q=1"), "url", "no query"),
    "reporter max_pending": (lambda: c.Reporter("svc", max_pending=0), "max_pending", "integer >= 1"),
    "measure batch": (lambda: c.measure(c.Reporter("svc")).__enter__(), "batch_size", "integer >= 1"),
    "measure decorator": (lambda: c.measure(c.Reporter("svc"))(_bad_fn), "fn", "batch_size parameter"),
    # OOM recovery
    "oom factor": (lambda: c.oom_attempts(4, factor=1.0), "factor", "(0, 1)"),
    "oom batch": (lambda: c.oom_attempts(0), "batch_size", "integer >= 1"),
    "oom max_attempts": (lambda: c.RecoveryPolicy(max_attempts=0), "max_attempts", "integer >= 1"),
    "oom decorator": (lambda: c.recover_oom()(_bad_fn), "fn", "batch_size parameter"),
    # admission and profiles
    "check_vram bytes": (lambda: c.check_vram(-1, 0), "required_bytes", "integer >= 0 bytes"),
    "check_vram type": (lambda: c.check_vram(1.5, 0), "required_bytes", "integer >= 0 bytes"),  # type: ignore[arg-type]
    "retry_after": (lambda: c.vram_middleware(-1), "retry_after_s", "seconds >= 0"),
    "app_id": (lambda: c.VRAMProfiles("a/b"), "app_id", "file name"),
    "headroom": (lambda: c.VRAMProfiles("app", headroom=0.5), "headroom", ">= 1"),
    # workers, hardware, limits
    "cores": (lambda: c.plan_workers(cores=0), "cores", "integer >= 1"),
    "workers env": (lambda: c.plan_workers(cores=1, environ={c.WORKERS_ENV: "many"}), c.WORKERS_ENV, "positive"),
    "decision gpu": (lambda: c.hw_summary_from_decision({"gpu": {"memory_total_bytes": -1}}),
                     "decision.gpu.memory_total_bytes", "integer >= 0"),
    "limit": (lambda: c.ConcurrencyLimits({"extraction": 0}), "limits['extraction']", "integer >= 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_module_refuses_a_bad_argument_with_the_one_error(case: str) -> None:
    call, name, allowed = CASES[case]
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.name == name
    assert allowed in info.value.allowed
    assert str(info.value).startswith(f"{name}: must be ")
    assert ", got " in str(info.value)


def test_the_error_is_a_value_error_and_a_type_error_and_pickles() -> None:
    """Code written for the errors the modules raised before (ValueError, TypeError for a non-int) still catches it."""
    for kind in (ValueError, TypeError):
        with pytest.raises(kind):
            c.check_vram(1.5, 0)  # type: ignore[arg-type]
    error = InvalidArgument("interval", "a finite number of seconds > 0", 0)
    again = pickle.loads(pickle.dumps(error))
    assert (again.name, again.allowed, again.value, str(again)) == ("interval", error.allowed, 0, str(error))


def test_a_bad_argument_changes_nothing() -> None:
    limits = c.ConcurrencyLimits({"a": 1})
    with pytest.raises(InvalidArgument):
        c.ConcurrencyLimits({"a": 1, "b": -1})
    assert limits.snapshot() == {"a": {"limit": 1, "in_use": 0, "waiting": 0}}


def _raises(tree: ast.AST) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            out.append((node.lineno, node.exc.func.id))
    return out


def test_no_client_module_raises_its_own_argument_error() -> None:
    """ValueError and TypeError are raised in validate.py only (BadAnswer, for the optimizer's answers, is not an
    argument's error)."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "validate.py":
            continue
        found: list[Any] = [(path.name, line, name) for line, name in _raises(ast.parse(path.read_text("utf-8")))
                            if name in ("ValueError", "TypeError")]
        assert not found, found
