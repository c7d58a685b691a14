"""``qdiag diagnose``: the verdict, with its evidence, for each configuration."""

from __future__ import annotations

import argparse

from . import options as o


def register(command) -> None:
    """Add ``diagnose`` through ``command(name, help, func)``."""
    di = command("diagnose", "the verdict: Signal Degradation or Computation Collapse, with its evidence", cmd_diagnose)
    di.add_argument("--evidence", choices=["full", "triage"], default="full",
                    help="triage: only what one forward per configuration gives (no patching, ablation, injection)")
    di.add_argument("--max-prompts", type=o.positive, default=None, help="at most this many reference-right prompts")
    di.add_argument("--max-tokens", type=o.positive, default=2048, help="token rows for the representation probes")
    di.add_argument("--batch-size", type=o.positive, default=16)
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
