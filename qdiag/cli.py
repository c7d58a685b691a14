"""``qdiag`` on the command line: one subcommand per analysis, each writing ``DIR/<name>.json``
(with a ``rows`` list), the same rows as CSV, and a figure.

    qdiag cliff --model smollm2-135m --bits 16,8,4,3,2 --method rtn,gptq --out results/
    qdiag components --bits 16,4,2 --method gptq --positions last_subject,last --out results/
    qdiag representations --bits 16,4,2 --method gptq --k 50 --out results/
    qdiag trace --bits 16,4,2 --method gptq --out results/
    qdiag patch --bits 4,2 --method gptq --positions last_subject,last --window 1 --out results/
    qdiag sensitivity --bits 4 --method gptq --scopes layer,weight_type,prefix --out results/
    qdiag repair --bits 4 --method gptq --protect-k 1,2 --kurtosis 5 --eora-ranks 16 --out results/
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from . import __version__


def _csv(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def _group_size(text: str) -> int | None:
    if text.lower() in ("none", "channel", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'channel', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be at least 1, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bits(text: str):
    from .quantize import parse_bits

    try:
        return parse_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _method(text: str) -> str:
    from .quantize import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")
    return text


def common_options(p: argparse.ArgumentParser) -> None:
    """Options every analysis shares: model, quantizer, data sizes, seed, output folder."""
    from .models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, hub id, HF folder or .gguf path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bits", type=_csv(_bits), default=[16, 8, 4, 3, 2], help="e.g. 16,8,4,3,2 (16 = FP)")
    p.add_argument("--method", type=_csv(_method), default=["rtn", "gptq"], help="rtn, gptq or both")
    p.add_argument("--group-size", type=_group_size, default=128, help="integer, or 'channel'")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--facts", type=_positive, default=200, help="ParaRel facts, spread over relations")
    p.add_argument("--ppl-tokens", type=_positive, default=16384)
    p.add_argument("--ppl-window", type=_positive, default=512)
    p.add_argument("--calib-samples", type=_positive, default=64)
    p.add_argument("--calib-len", type=_positive, default=512)
    p.add_argument("--data", default=None, help="data folder (default: $QDIAG_DATA, cache, download, probe set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdiag", description="Why does a quantized LLM fail?")
    parser.add_argument("--version", action="version", version=f"qdiag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cliff = sub.add_parser("cliff", help="perplexity and factual recall across bit widths")
    common_options(cliff)
    cliff.add_argument("--generations", type=int, default=4, help="prompts to show greedy continuations for")
    cliff.set_defaults(func=cmd_cliff)

    comp = sub.add_parser("components", help="attention entropy / JSD, MLP gate flips, neuron overlap, MLP cosine")
    common_options(comp)
    comp.add_argument("--positions", type=_csv(str), default=["last_subject", "last"],
                      help="query tokens: last_subject, last, all (comma-separated)")
    comp.add_argument("--top-fraction", type=float, default=0.01, help="share of top neurons for the Jaccard")
    comp.add_argument("--batch-size", type=_positive, default=16)
    comp.set_defaults(func=cmd_components)

    rep = sub.add_parser("representations", help="CKA, principal-subspace similarity, error alignment")
    common_options(rep)
    rep.add_argument("--position", default="all", help="tokens: last_subject, last or all")
    rep.add_argument("--k", type=_positive, default=50, help="principal directions")
    rep.add_argument("--max-tokens", type=_positive, default=2048, help="token rows per layer")
    rep.add_argument("--batch-size", type=_positive, default=16)
    rep.set_defaults(func=cmd_representations)

    tr = sub.add_parser("trace", help="logit lens: the answer's probability and rank at every layer")
    common_options(tr)
    tr.add_argument("--no-final-norm", dest="final_norm", action="store_false",
                    help="unembed the raw residual stream (default: apply the final norm first)")
    tr.add_argument("--batch-size", type=_positive, default=16)
    tr.set_defaults(func=cmd_trace)

    pa = sub.add_parser("patch", help="cross-model activation patching, zero ablation, clean-signal injection")
    common_options(pa)
    pa.add_argument("--positions", type=_csv(str), default=["last_subject", "last"],
                    help="tokens to patch: last_subject, last")
    pa.add_argument("--sites", type=_csv(str), default=["resid", "attn", "mlp"], help="resid, attn, mlp")
    pa.add_argument("--window", type=_positive, default=1, help="consecutive layers patched together")
    pa.add_argument("--no-ablation", dest="ablation", action="store_false")
    pa.add_argument("--no-injection", dest="injection", action="store_false")
    pa.add_argument("--batch-size", type=_positive, default=8)
    pa.set_defaults(func=cmd_patch)

    se = sub.add_parser("sensitivity", help="quantize one layer / weight type / prefix at a time")
    common_options(se)
    se.add_argument("--scopes", type=_csv(str), default=["layer", "weight_type", "prefix"],
                    help="layer, weight_type, prefix")
    se.set_defaults(func=cmd_sensitivity)

    re_ = sub.add_parser("repair", help="training-free repairs against uniform quantization at equal bits")
    common_options(re_)
    re_.add_argument("--protect-k", type=_csv(int), default=[1, 2], help="first layers kept at 8 bits")
    re_.add_argument("--kurtosis", type=_csv(float), default=[], help="excess-kurtosis thresholds for protection")
    re_.add_argument("--granularity", choices=["matrix", "channel"], default="matrix")
    re_.add_argument("--eora-ranks", type=_csv(int), default=[], help="ranks of the low-rank compensation")
    re_.add_argument("--alphas", type=_csv(float), default=None, help="amplification weights to choose from")
    re_.add_argument("--inject-layer", type=int, default=None, help="also try clean-signal injection at this layer")
    re_.add_argument("--held-out", type=float, default=0.5, help="share of facts used to choose amplification")
    re_.set_defaults(func=cmd_repair)
    return parser


def setup(args: argparse.Namespace, calibrate: bool = False):
    """Load what every analysis needs, with the shared options (calibration text when GPTQ or
    ``calibrate`` asks for it)."""
    from .experiment import prepare

    calibrate = calibrate or "gptq" in args.method
    return prepare(args.model, args.facts, args.ppl_tokens, args.calib_samples, args.calib_len, args.seed,
                   args.data, args.device, args.dtype, calibrate=calibrate)


def meta(args: argparse.Namespace, **extra) -> dict:
    """What the run was: arguments, versions and machine, stored beside the rows."""
    import torch
    import transformers

    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    return {"qdiag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": opts, **extra}


def cmd_cliff(args: argparse.Namespace) -> None:
    from .cliff import run_cliff, save_cliff

    specs = _specs(args)
    exp = setup(args)
    res = run_cliff(exp.model, exp.facts, specs, exp.ppl_tokens, args.ppl_window, exp.calib, args.generations,
                    args.seed, progress=not args.quiet)
    save_cliff(res, args.out, meta(args, n_facts=len(exp.facts), ppl_tokens=int(exp.ppl_tokens.numel())),
               title=f"{args.model}: the cliff")
    print(res.rows[["method", "bits", "avg_bits", "ppl", "acc_any", "acc_majority", "acc_all",
                    "median_rank"]].to_string(index=False))


def _specs(args: argparse.Namespace):
    from .cliff import cliff_specs

    return cliff_specs(args.bits, args.method, args.group_size, args.sym)


def cmd_components(args: argparse.Namespace) -> None:
    from .arch import resolve
    from .components import run_components, save_components
    from .positions import check

    check(args.positions)
    specs = _specs(args)
    exp = setup(args)
    rows = run_components(exp.model, exp.facts, specs, exp.calib, args.positions, args.top_fraction,
                          args.batch_size, progress=not args.quiet)
    save_components(rows, args.out, meta(args, n_facts=len(exp.facts)), gated=resolve(exp.model).gated,
                    title=args.model)
    layer_rows = rows[rows["head"].isna()]
    print(layer_rows.groupby(["method", "bits", "position"], sort=False)[
        ["attn_entropy_fp", "attn_entropy", "attn_jsd", "gate_sfr", "neuron_jaccard", "mlp_cosine"]].mean()
        .round(3).to_string())


def cmd_representations(args: argparse.Namespace) -> None:
    from .positions import check
    from .representations import run_representations, save_representations

    check([args.position])
    specs = _specs(args)
    exp = setup(args)
    res = run_representations(exp.model, exp.facts, specs, exp.calib, args.position, args.k, args.max_tokens,
                              args.batch_size, progress=not args.quiet)
    save_representations(res, args.out, meta(args, n_facts=len(exp.facts)), title=args.model)
    print(res.rows.groupby(["method", "bits"], sort=False)[["subspace_sim", "error_alignment", "cka_same_layer"]]
          .mean().round(3).to_string())


def cmd_trace(args: argparse.Namespace) -> None:
    from .lens import run_lens, save_lens

    specs = _specs(args)
    exp = setup(args)
    res = run_lens(exp.model, exp.facts, specs, exp.calib, args.final_norm, args.batch_size, args.seed,
                   progress=not args.quiet)
    save_lens(res, args.out, meta(args, n_facts=len(exp.facts)), title=args.model)
    last = res.rows[res.rows.layer == res.rows.layer.max()]
    print(last[["method", "bits", "model", "subset", "prob", "rank", "n"]].round(4).to_string(index=False))


def cmd_patch(args: argparse.Namespace) -> None:
    from .causal import run_causal, save_causal
    from .patch import SITES
    from .positions import check

    check(args.positions)
    if "all" in args.positions:
        raise ValueError("patching works at one token per prompt: use last_subject and/or last")
    bad = [s for s in args.sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown sites {bad}; choose from {', '.join(SITES)}")
    specs = _specs(args)
    if all(s.is_full_precision for s in specs):
        raise ValueError("patching needs a quantized width (16 bits is the reference itself): e.g. --bits 4,2")
    exp = setup(args)
    res = run_causal(exp.model, exp.facts, specs, exp.calib, args.positions, args.sites, args.window, args.ablation,
                     args.injection, args.batch_size, args.seed, progress=not args.quiet)
    save_causal(res, args.out, meta(args, n_facts=len(exp.facts)), title=args.model)
    p = res.patching
    print(p[p.subset == "all"].groupby(["method", "bits", "site", "position"], sort=False).recovery.max()
          .round(3).to_string())


def _one_width(specs: list) -> list:
    quantized = [s for s in specs if not s.is_full_precision]
    if not quantized:
        raise ValueError("this analysis needs a quantized width (16 bits is the reference itself): e.g. --bits 4")
    return quantized


def cmd_sensitivity(args: argparse.Namespace) -> None:
    import pandas as pd

    from .sensitivity import SCOPES, SensitivityResult, first_domino, run_sensitivity, save_sensitivity

    bad = [s for s in args.scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scopes {bad}; choose from {', '.join(SCOPES)}")
    specs = _one_width(_specs(args))
    exp = setup(args)
    runs = [run_sensitivity(exp.model, exp.facts, spec, exp.calib, args.scopes, exp.ppl_tokens, args.ppl_window,
                            args.seed, progress=not args.quiet) for spec in specs]
    merged = SensitivityResult(pd.concat([r.rows for r in runs], ignore_index=True),
                               pd.concat([r.prompts for r in runs], ignore_index=True))
    save_sensitivity(merged, args.out, meta(args, n_facts=len(exp.facts)), title=args.model)
    print(merged.rows[["method", "bits", "scope", "target", "avg_bits", "robust_acc", "failure_acc", "ppl"]]
          .round(3).to_string(index=False))
    print(first_domino(merged.rows))


def cmd_repair(args: argparse.Namespace) -> None:
    from .amplify import ALPHAS
    from .repair import run_repair, save_repair

    specs = _one_width(_specs(args))
    if len(specs) > 1:
        raise ValueError("repair one width at a time: give one --bits (and one --method)")
    if args.eora_ranks and any(r < 1 for r in args.eora_ranks):
        raise ValueError("EoRA ranks must be at least 1")
    exp = setup(args, calibrate=bool(args.eora_ranks))
    res = run_repair(exp.model, exp.facts, specs[0], exp.calib, exp.ppl_tokens, args.ppl_window, args.protect_k,
                     args.kurtosis, args.granularity, args.eora_ranks, args.alphas or ALPHAS, args.inject_layer,
                     args.held_out, args.seed, progress=not args.quiet)
    save_repair(res, args.out, meta(args, n_facts=len(exp.facts)), title=args.model)
    print(res.rows[["repair", "params", "avg_bits", "failure_acc", "robust_acc", "ppl", "baseline_avg_bits",
                    "baseline_failure_acc", "baseline_robust_acc", "baseline_ppl"]].round(3).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"qdiag {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
