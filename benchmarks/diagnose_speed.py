"""Time of ``qdiag diagnose`` against the separate commands that produce the same evidence, on
the default model (or ``--model``), each run as a user would run it (a fresh process each).

    python benchmarks/diagnose_speed.py [--evidence triage|full] [--bits 8,4,3,2] [--method rtn]

The triage's evidence is that of ``cliff`` (rank, output), ``lens``, ``components`` and
``representations``; the full diagnosis adds ``causal``. Prints seconds and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qdiag.cli", *args, "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--evidence", choices=["triage", "full"], default="triage")
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--facts", default="200")
    args = ap.parse_args()
    common = ["--model", args.model, "--bits", args.bits, "--method", args.method, "--facts", args.facts]
    commands = ["cliff", "lens", "components", "representations"] + (["causal"] if args.evidence == "full" else [])
    with tempfile.TemporaryDirectory() as out:
        diagnose = timed(["diagnose", *common, "--evidence", args.evidence, "--out", f"{out}/d"])
        separate = {}
        for c in commands:
            extra = ["--ppl-tokens", "2048"] if c == "cliff" else []  # the diagnosis's text sample
            separate[c] = timed([c, *common, *extra, "--out", f"{out}/{c}"])
    for c, s in separate.items():
        print(f"{c:16s} {s:7.1f} s")
    total = sum(separate.values())
    print(f"{'separate total':16s} {total:7.1f} s")
    print(f"{'diagnose':16s} {diagnose:7.1f} s ({args.evidence})")
    print(f"ratio diagnose / separate commands: {diagnose / total:.2f}")


if __name__ == "__main__":
    main()
