"""Peak memory of ``qdiag diagnose`` over one checkpoint and over six, as ratios to the base's weight bytes.

    python benchmarks/checkpoint_memory.py [--known 40] [--out benchmarks/results]

Each run is its own ``qdiag diagnose --evidence triage`` process on the default model; its peak
resident memory is what ``wait4`` reports for it. The files are llama-quantize's
(``qdiag.fixtures.llama_cpp_files``): one run on the float file (F32, the largest), one on the float
file and five quantized ones (Q8_0, Q4_K_M, Q3_K_M, Q2_K, IQ3_S). ``diagnose`` reads and checks every
checkpoint first, releasing each one's weights, then reads each again when it reaches it, so the peak
should not grow with the number of files: the goal is the six-file peak within 10% of the one-file
peak, and both at most 2.5 times the base's weight bytes. Needs llama.cpp's tools for the files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from qdiag import fixtures
from qdiag.core.io import write_csv
from qdiag.quant import llama_cpp

SIX = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_S")


def run(files: list[Path], known: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qdiag.cli", "diagnose", "--model", "smollm2-135m", "--bits", "16",
           "--quantized", ",".join(map(str, files)), "--evidence", "triage", "--known", str(known),
           "--screen-facts", str(10 * known), "--calib-samples", "4", "--ppl-tokens", "512", "--quiet",
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return {"files": len(files), "peak_bytes": usage.ru_maxrss * 1024, "seconds": wall,
            "seconds_per_file": wall / len(files)}


def base_bytes() -> int:
    from qdiag.core.arch import unwrap
    from qdiag.core.models import load_model

    hf = unwrap(load_model("smollm2-135m"))
    return sum(p.numel() * p.element_size() for p in hf.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", type=int, default=40, help="reference-right prompts diagnosed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    files = fixtures.llama_cpp_files("smollm2", llama_cpp.require())
    weights = base_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chosen in ([files["F32"]], [files[t] for t in SIX]):
            r = run(chosen, args.known, Path(tmp) / str(len(chosen)))
            r["ratio_to_weights"] = r["peak_bytes"] / weights
            rows.append(r)
            print(f"{r['files']} file(s): peak {r['peak_bytes'] / 2**30:.2f} GiB = {r['ratio_to_weights']:.2f} x the "
                  f"base's weights ({weights / 2**20:.0f} MiB); {r['seconds']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table["six_over_one"] = table.peak_bytes / table.peak_bytes.iloc[0]
    print(f"six files' peak / one file's: {table.six_over_one.iloc[-1]:.3f} (goal <= 1.10); "
          f"largest ratio to the weights: {table.ratio_to_weights.max():.2f} (goal <= 2.5)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "checkpoint_memory.csv", table)


if __name__ == "__main__":
    main()
