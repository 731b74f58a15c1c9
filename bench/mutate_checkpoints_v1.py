"""Checkpoint mutations of the version-1 golden compressed file (tests/golden/checkpoint-v1*).

Version-1 files carry no checksum of raw tensors and none of the embedded original header, so an
edit there can restore silently different bytes by design; such outcomes are listed as
"v1-unchecked" (not counted as problems).  What must still hold for v1 input: no exception other
than ECF8Error, no hang, crash or memory blow-up, no files left behind, and verify never passing a
file that decompress then refuses.
"""

from __future__ import annotations

from pathlib import Path

from mutate_checkpoints import *  # noqa: F401,F403  (same kinds and helpers)
from mutate_checkpoints import KINDS, run_case as _run_case  # noqa: F401

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


def prepare(tmp, args) -> dict:
    return {"plain": str(GOLDEN / "checkpoint-v1.plain.safetensors"),
            "packed": str(GOLDEN / "checkpoint-v1.safetensors"), "cli_every": 0}


def run_case(state, seed, case):
    outcome, message = _run_case(state, seed, case)
    return ("v1-unchecked" if outcome in ("DIFFERENT", "accepted") else outcome), message
