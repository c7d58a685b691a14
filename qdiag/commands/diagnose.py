"""``qdiag diagnose`` (the verdict, with its evidence, for each configuration) and ``qdiag prescribe``
(what to give more bits, under a byte budget, written for the engine that made the file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options as o


def register(command) -> None:
    """Add ``diagnose`` through ``command(name, help, func)``."""
    di = command("diagnose", "the verdict: Signal Degradation or Computation Collapse, with its evidence", cmd_diagnose)
    di.add_argument("--evidence", choices=["full", "triage"], default="full",
                    help="triage: only what one forward per configuration gives (no patching, ablation, injection)")
    di.add_argument("--max-prompts", type=o.positive, default=None, help="at most this many reference-right prompts")
    di.add_argument("--max-tokens", type=o.positive, default=2048, help="token rows for the representation probes")
    di.add_argument("--batch-size", type=o.positive, default=64, help="prompts per forward (memory grows with it)")
    di.add_argument("--try-remedy", action="store_true", help="apply the suggested weight repairs and diagnose again")
    di.set_defaults(ppl_tokens=2048, default_bits=[8, 4, 3, 2])


def cmd_diagnose(args: argparse.Namespace) -> None:
    from ..diagnosis import diagnose

    o.specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = o.setup(args, calibrate=args.try_remedy)
    specs = o.configs(args, exp, quantized=True)
    res = diagnose(exp.model, exp.analysed, specs, exp.calib, exp.ppl_tokens, args.ppl_window,
                   causal=args.evidence == "full", batch_size=args.batch_size, max_prompts=args.max_prompts,
                   max_tokens=args.max_tokens, try_remedy=args.try_remedy, seed=args.seed, progress=not args.quiet)
    res.meta = o.meta(args, **o.facts_meta(exp), **res.meta)
    res.save(args.out, title=args.model)
    print(res.verdicts[["method", "bits", "group_size", "avg_bits", "verdict", "score", "score_lo", "score_hi",
                        "lost"]].round(3).to_string(index=False))


def register_prescribe(command) -> None:
    """Add ``prescribe`` through ``command(name, help, func)``."""
    pr = command("prescribe", "which tensors get which bits under a byte budget, written for the file's engine",
                 cmd_prescribe)
    pr.add_argument("--budget", default="+0.25bpw",
                    help="bytes to spend: +0.25bpw (over the configuration's), 4.8bpw, +5%%, 120MB")
    pr.add_argument("--engine", choices=["llama.cpp", "gptqmodel", "llm-compressor"], default=None,
                    help="the engine to write for (default: the one that made the file)")
    pr.add_argument("--imatrix", type=Path, default=None, help="llama.cpp: an importance matrix from llama-imatrix")
    pr.add_argument("--types", type=o.csv_of(str.upper), default=None,
                    help="llama.cpp: the types to choose from, e.g. Q3_K,Q4_K,Q5_K,Q6_K,Q8_0 (default: each width's)")
    pr.add_argument("--base-gguf", default="BASE-F32.gguf", help="llama.cpp: the base's float GGUF, for the command")
    pr.add_argument("--kl-windows", type=o.positive, default=4, help="calibration windows for each unit's KL")
    pr.add_argument("--fisher-windows", type=o.positive, default=16, help="calibration windows for the Fisher")
    pr.set_defaults(known=0, calib_samples=16)


def cmd_prescribe(args: argparse.Namespace) -> None:
    from ..diagnosis.prescribe import parse_budget, prescribe

    parse_budget(args.budget, 1, 1)  # a budget that does not parse fails now, before the model loads
    if args.imatrix is not None and not args.imatrix.exists():
        raise FileNotFoundError(f"no importance matrix at {args.imatrix}")
    o.specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = o.setup(args, calibrate=True, ppl=False)
    configs = o.configs(args, exp, quantized=True)
    from ..measure.widths import each_width

    for w in each_width(exp.model, configs, exp.calib, progress=not args.quiet, desc="prescribe"):
        p = prescribe(exp.model, w, exp.calib, args.budget, args.engine, args.imatrix,
                      tuple(args.types) if args.types else None, args.kl_windows, args.fisher_windows,
                      seed=args.seed, base_file=args.base_gguf, progress=not args.quiet)
        p.meta = o.meta(args, **p.meta)
        out = args.out if len(configs) == 1 else args.out / _slug(w)
        p.save(out)
        print(p.report())


def _slug(w) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{w.method}-w{w.bits}").strip("_")
