"""Seconds per configuration of ``qdiag diagnose --evidence triage`` at 400 reference-right prompts,
on the default model, as ratios to the goal of 60 s per configuration on the machine it runs on.

    python benchmarks/triage_speed.py [--known 400] [--files Q4_K_M,Q2_K] [--rtn 4] [--batch-size 32]

One ``qdiag diagnose`` process (as a user runs it) over llama-quantize's files of the default model
(``qdiag.fixtures.llama_cpp_files``) and qdiag's own RTN widths; each configuration's cost is what
the diagnosis records for it (``seconds``: made = quantized or read from its file and checked,
measured = its probes and its output's KL on text), the reference's one-time share
(``reference_seconds``: scoring and recording the reference on the prompts) apart; the process's
peak resident memory is what ``wait4`` reports. Needs llama.cpp's
tools for the files (``--files ''`` runs the RTN widths only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from qdiag.core.io import write_csv

GOAL_SECONDS = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", type=int, default=400, help="reference-right prompts diagnosed")
    ap.add_argument("--files", default="Q4_K_M,Q2_K", help="llama-quantize types of the default model")
    ap.add_argument("--rtn", default="4", help="qdiag RTN widths, comma-separated ('' for none)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default: diagnose's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "qdiag.cli", "diagnose", "--model", "smollm2-135m", "--evidence", "triage",
           "--known", str(args.known), "--quiet"]
    types = [t for t in args.files.split(",") if t]
    if types:
        from qdiag import fixtures
        from qdiag.quant import llama_cpp

        files = fixtures.llama_cpp_files("smollm2", llama_cpp.require(), tuple(types))
        cmd += ["--quantized", ",".join(str(files[t]) for t in types)]
    cmd += ["--bits", args.rtn or "16", "--method", "rtn"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
        result = json.loads((Path(out) / "diagnosis.json").read_text())
    rows = [{"configuration": f"{c['method']} {c['bits']}-bit", **c["seconds"],
             "per_configuration": c["seconds"]["made"] + c["seconds"]["measured"]}
            for c in result["configurations"]]
    table = pd.DataFrame(rows)
    table["ratio_to_goal"] = table.per_configuration / GOAL_SECONDS
    n = result["meta"]["n_prompts"]
    batch = result["meta"]["args"]["batch_size"]
    print(f"qdiag diagnose --evidence triage, default model, {n} prompts, batches of {batch}, "
          f"{os.cpu_count()} CPU threads")
    print(table.round(2).to_string(index=False))
    print(f"reference (once): {result['meta']['reference_seconds']:.1f} s; process wall {wall:.1f} s "
          f"for {len(rows)} configurations; peak resident memory {usage.ru_maxrss / 2**20:.2f} GiB")
    print(f"ratio worst configuration / {GOAL_SECONDS:.0f} s goal: {table.ratio_to_goal.max():.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "triage_speed.csv",
              table.assign(prompts=n, batch_size=batch, cpus=os.cpu_count(), process_wall=wall,
                           peak_bytes=usage.ru_maxrss * 1024))


if __name__ == "__main__":
    main()
