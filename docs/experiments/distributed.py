"""Data-parallel cost on this machine: 2 processes x half batch against 1 process x full batch (gloo, CPU).

Runs ``docs/examples/torch_ddp.py --measure`` with 1 and with 2 processes and
tabulates, per method and benchmark net (small [64, 64, 10] B=64, medium
[784, 512, 256, 10] B=512), the median step time and what each rank sends per
step: collectives and bytes, also as a multiple of the parameter vector.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import caption, main  # noqa: E402

NAME = "distributed"
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "torch_ddp.py")


def _measure(procs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        subprocess.run([sys.executable, EXAMPLE, "--measure", out, "--procs", str(procs)], check=True)
        with open(out) as fh:
            return json.load(fh)


def run(args: object) -> dict:
    one, two = _measure(1), _measure(2)
    rows = []
    for a, b in zip(one, two):
        rows.append({"net": a["net"], "method": a["method"], "settings": b["settings"], "ms_1": a["ms"],
                     "ms_2": b["ms"], "collectives": b["collectives"], "bytes": b["bytes"],
                     "param_bytes": b["param_bytes"]})
    return {"rows": rows}


def render(data: dict) -> dict[str, str]:
    lines = [caption(data, NAME), "", "| net | method | 1 process, full batch (ms) | 2 processes, half batch (ms) | ratio | "
             "collectives / step | bytes sent / step | parameter vectors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['net']} | {r['method']} | {r['ms_1']:.1f} | {r['ms_2']:.1f} | {r['ms_2'] / r['ms_1']:.2f} | "
                     f"{r['collectives']:.0f} | {r['bytes']:.0f} | {r['bytes'] / r['param_bytes']:.2f} |")
    return {"": "\n".join(lines)}


if __name__ == "__main__":
    main(sys.modules[__name__])
