"""Saves a growing counter with :class:`StateFile` in a loop, for the kill -9 test in test_persistence.

``python -m tests.state_writer PATH [LIMIT]`` saves documents 1, 2, ... (each with ~200 KB of
padding that repeats its counter, so that a mix of two documents is detectable) and prints each
counter, flushed, only after its save returned. It stops after ``LIMIT`` saves (default 1,000,000)
or when nobody reads its output any more.
"""

from __future__ import annotations

import sys
from typing import Any

from optimizer.persistence import STATE_VERSION, StateFile

PAD_REPEAT = 25_000  # an 8-digit counter repeated: 200,000 characters


def padding(n: int) -> str:
    return f"{n:08d}" * PAD_REPEAT


def document(n: int) -> dict[str, Any]:
    return {"version": STATE_VERSION, "saved_at": float(n), "settings": {}, "services": [], "counter": n,
            "padding": padding(n)}


def main(argv: list[str]) -> int:
    state = StateFile(argv[1])
    limit = int(argv[2]) if len(argv) > 2 else 1_000_000
    for n in range(1, limit + 1):
        state.save(document(n))
        try:
            print(n, flush=True)
        except BrokenPipeError:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
