"""What the examples share: the number of steps from the command line, and the result line the tests read."""

from __future__ import annotations

import argparse


def steps(doc: str) -> int:
    """``--steps`` (default 300), or 30 with ``--smoke`` (the quick check the test suite runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="30 steps per method (a quick check)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    return 30 if args.smoke else args.steps


def report(name: str, first_loss: float, last_loss: float, accuracy: float) -> None:
    """One line per method: the loss of the first step, the mean of the last five, the test accuracy."""
    print(f"{name:10s} loss {first_loss:.3f} -> {last_loss:.3f}   test accuracy {accuracy:.3f}")
