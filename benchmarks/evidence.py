"""How much evidence the book's chapters stand on, against the targets of the evidence issue:
at least 300 reference-right prompts in chapters 2-8, and at least 100 Failure prompts at 4 bits
(GPTQ, groups of 128) wherever the Failure subset is used, the held-out half chapter 7 scores on
included. Reads the book's parameters (``book/params.yml``), screens as the chapters do (from the
run store when it is there) and prints the counts and their ratios to the targets.

    python benchmarks/evidence.py [--chapter 07_repair] [--bits 4] [--method gptq]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from qdiag import experiment
from qdiag.analyses.repair import split_facts
from qdiag.measure.screen import describe
from qdiag.measure.widths import Reference, each_width
from qdiag.quant.quantize import QuantSpec

TARGET_RIGHT, TARGET_FAILURE = 300, 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chapter", default="07_repair", help="whose parameters (book/params.yml) to use")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "book" / "params.yml").read_text())[args.chapter]
    t0 = time.perf_counter()
    exp = experiment.prepare(n_facts=0, known=params["known"], screen_facts=params["screen_facts"], ppl_tokens=0,
                             calib_samples=params["calib_samples"], calib_len=params["calib_len"],
                             calibrate=args.method == "gptq")
    print(describe(exp.screening), f"(prepare: {time.perf_counter() - t0:.0f} s)")
    ref = Reference(exp.model, exp.known)
    spec = QuantSpec(args.bits, args.group_size, True, args.method)
    w = next(iter(each_width(exp.model, [spec], exp.calib, progress=False)))
    right = ref.reference_right(ref.score(exp.model, w))
    _, scored = split_facts(exp.known, params.get("held_out", 0.5), params.get("seed", 0))
    held = right[right.fact.isin({f.id for f in scored})]
    n_right, n_fail = len(right), int((right.subset == "failure").sum())
    n_held = int((held.subset == "failure").sum())
    print(f"reference-right prompts analysed: {n_right} (target {TARGET_RIGHT}: ratio {n_right / TARGET_RIGHT:.2f})")
    print(f"Failure prompts at {args.method.upper()} {args.bits}-bit g{args.group_size}: {n_fail} "
          f"(target {TARGET_FAILURE}: ratio {n_fail / TARGET_FAILURE:.2f})")
    print(f"  in the held-out half chapter 7 scores on: {n_held} (ratio {n_held / TARGET_FAILURE:.2f})")


if __name__ == "__main__":
    main()
