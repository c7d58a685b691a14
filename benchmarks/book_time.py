"""Minutes to execute every chapter of the book at one tier, from cold, as a ratio to the tier's goal
on the machine it runs on: the classroom tier within 15 minutes on 2 CPU cores, the book's parameters
within 20 minutes on one GPU.

    python benchmarks/book_time.py [--tier classroom|book] [--only 01_cliff 08_diagnosis] [--warm]

One ``python -m qdiag.book --no-render --fresh`` process (as ``make book`` runs it, less the HTML
render) over a copy of ``book/`` and ``notebooks/`` in a temporary folder, with the run store and the
quantized-model cache empty (``--warm``: the book's own ``book/_cache``), and no float copy of the
default model's GGUF file, so nothing an earlier build computed is reused: the screening, GPTQ and
the perplexities are all paid for. llama.cpp's tools and
its fixture files (``~/.cache/qdiag/fixtures``) are not rebuilt: ``make tools`` is a step of its own.
Prints each chapter's seconds and writes ``results/book_time_<tier>.csv``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from qdiag.core.io import write_csv

ROOT = Path(__file__).resolve().parent.parent
GOAL_MINUTES = {"classroom": 15.0, "book": 20.0, "smoke": 15.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", choices=list(GOAL_MINUTES), default="classroom")
    ap.add_argument("--only", nargs="*", help="chapters (notebook names without .ipynb)")
    ap.add_argument("--warm", action="store_true", help="reuse the book's store and quantized models")
    ap.add_argument("--device-map", help="passed to the build (a GPU run: auto)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qdiag-book-time-") as tmp:
        root = Path(tmp)
        shutil.copytree(ROOT / "notebooks", root / "notebooks")
        shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_build", "_cache", "notebooks",
                                                                                     "results", "status.md"))
        (root / "qdiag").symlink_to(ROOT / "qdiag")
        env = {**os.environ}
        cache = ROOT / "book" / "_cache" if args.warm else root / "cache"
        env["QDIAG_STORE"], env["QDIAG_QUANT_CACHE"] = str(cache / "store"), str(cache / "quantized")
        if not args.warm:  # the first chapter reads the GGUF file and keeps its float copy, as on a fresh machine
            env["QDIAG_MODEL_CACHE"] = str(cache / "models")
        cmd = [sys.executable, "-m", "qdiag.book", "--root", str(root), "--tier", args.tier, "--no-render", "--fresh"]
        if args.only:
            cmd += ["--only", *args.only]
        if args.device_map:
            cmd += ["--device-map", args.device_map]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [{"chapter": m[1], "seconds": float(m[2])}
            for m in re.finditer(r"^  (\w+): (\d+) s$", proc.stdout, flags=re.M)]
    table = pd.DataFrame(rows)
    goal = GOAL_MINUTES[args.tier] * 60
    import torch

    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
             else f"{os.cpu_count()} CPU threads, no GPU")
    print(f"python -m qdiag.book --tier {args.tier}, {'warm' if args.warm else 'cold'} store, {where}")
    print(table.to_string(index=False))
    print(f"chapters {table.seconds.sum():.0f} s, process wall {wall:.0f} s (imports and the build's own work "
          f"included); ratio wall / {goal / 60:.0f} min goal: {wall / goal:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"book_time_{args.tier}.csv",
              table.assign(tier=args.tier, warm=args.warm, machine=where, process_wall=wall, goal_seconds=goal))


if __name__ == "__main__":
    main()
