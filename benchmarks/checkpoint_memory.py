"""Peak memory of ``qdiag diagnose`` over one checkpoint and over six, as ratios to the base's weight bytes.

    python benchmarks/checkpoint_memory.py [--known 40] [--out benchmarks/results]

Each run is its own ``qdiag diagnose --evidence triage`` process on the default model; its peak
resident memory is what ``wait4`` reports for it. The files are llama-quantize's
(``qdiag.fixtures.llama_cpp_files``): one run on the float file (F32, the largest), one on Q4_K_M, one
on the float file and five quantized ones (Q8_0, Q4_K_M, Q3_K_M, Q2_K, IQ3_S). ``diagnose`` reads and
checks every checkpoint first, releasing each one's weights, then reads each again when it reaches it,
so the peak should not grow with the number of files: the goal is the six-file peak within 10% of the
one-file peak, and at most 2.5 times the base's weight bytes. A process that only imports the
libraries and loads the tokenizer is measured too: that fixed cost does not grow with the model, and
on a 135M model it is a large share of the peak, so the ratio is printed with and without it. Needs
llama.cpp's tools for the files.
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


FIXED = """
import qdiag.cli, torch, transformers
from transformers import AutoTokenizer
from qdiag.core.models import locate
where, gguf = locate("smollm2-135m")
AutoTokenizer.from_pretrained(where, gguf_file=gguf)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def fixed_bytes() -> int:
    """Peak memory of a process that only imports qdiag, torch and transformers and loads the
    tokenizer: what any run costs whatever the model's size."""
    # its own high-water mark: wait4's would be at least this (parent) process's, which the child
    # inherits until it replaces its memory (the runs below are far above it)
    out = subprocess.run([sys.executable, "-c", FIXED], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024


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
    fixed = fixed_bytes()
    print(f"fixed cost (python, torch, transformers, qdiag, the tokenizer): {fixed / 2**30:.2f} GiB", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # the runs first: a child's peak counts this process's until exec
        for names in (["F32"], ["Q4_K_M"], list(SIX)):
            r = run([files[t] for t in names], args.known, Path(tmp) / "-".join(names))
            rows.append({**r, "checkpoints": "+".join(names), "fixed_bytes": fixed})
    weights = base_bytes()
    for r in rows:
        r.update(ratio_to_weights=r["peak_bytes"] / weights, ratio_above_fixed=(r["peak_bytes"] - fixed) / weights)
        print(f"{r['checkpoints']}: peak {r['peak_bytes'] / 2**30:.2f} GiB = {r['ratio_to_weights']:.2f} x the "
              f"base's weights ({weights / 2**20:.0f} MiB), {r['ratio_above_fixed']:.2f} x above the fixed cost; "
              f"{r['seconds']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table["six_over_one"] = table.peak_bytes / table.peak_bytes.iloc[0]
    print(f"six files' peak / the largest one's (F32): {table.six_over_one.iloc[-1]:.3f} (goal <= 1.10); "
          f"largest ratio to the weights: {table.ratio_to_weights.max():.2f}, above the fixed cost "
          f"{table.ratio_above_fixed.max():.2f} (goal <= 2.5)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "checkpoint_memory.csv", table)


if __name__ == "__main__":
    main()
