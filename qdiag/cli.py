"""``qdiag`` on the command line: one subcommand per analysis, named as its module, its notebook
and its result file, each writing ``DIR/<name>.json`` (with a ``rows`` list), the same rows as
CSV, and figures.

    qdiag cliff --model smollm2-135m --bits 16,8,4,3,2 --method rtn,gptq --out results/
    qdiag lens --bits 16,4,2 --method gptq --out results/
    qdiag causal --bits 4,2 --method gptq --positions last_subject,last --window 1 --out results/
    qdiag components --bits 16,4,2 --method gptq --positions last_subject,last --out results/
    qdiag representations --bits 16,4,2 --method gptq --k 50 --out results/
    qdiag sensitivity --bits 4 --method gptq --scopes layer,weight_type,prefix --out results/
    qdiag repair --bits 4 --method gptq --protect-k 1,2 --kurtosis 5 --eora-ranks 16 --out results/
"""

from __future__ import annotations

# Each command imports its analysis (pandas, matplotlib, transformers, nnsight) when it runs, so
# that `qdiag --help` and refusals of bad input come at once.
import argparse
import sys
from pathlib import Path

from . import __version__
from .core.models import DEFAULT_MODEL
from .quant.quantize import CALIBRATED, METHODS, parse_bits


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
    try:
        return parse_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return value


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    return _positive(text)


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")
    return text


def common_options(p: argparse.ArgumentParser) -> None:
    """Options every analysis shares: model, quantizer, data sizes, seed, output folder."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, hub id, HF folder or .gguf path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the model over several GPUs (accelerate's placement); --device is then unused")
    p.add_argument("--max-memory", help="with --device-map: memory per device, e.g. '0=70GiB,1=70GiB'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bits", type=_csv(_bits), default=None,
                   help="e.g. 16,8,4,3,2 (16 = FP); default 16,8,4,3,2, or only 16 with --quantized")
    p.add_argument("--method", type=_csv(_method), default=["rtn", "gptq"],
                   help="rtn, gptq, hqq, awq and/or llama.cpp types (q4_0, q4_1, q5_0, q5_1, q8_0, tq1_0, tq2_0, "
                        "mxfp4), comma-separated; a llama.cpp type fixes its own width")
    p.add_argument("--quantized", type=_csv(str), default=[],
                   help="existing quantized checkpoints of --model (.gguf files; GPTQ, AWQ, compressed-tensors "
                        "folders; or hub ids org/name, org/name/file.gguf), comma-separated: analysed next to the "
                        "--bits/--method configurations")
    p.add_argument("--group-size", type=_group_size, default=128, help="integer, or 'channel'")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--facts", type=_positive, default=200,
                   help="random ParaRel facts, spread over relations (the cliff's recall)")
    p.add_argument("--known", type=_non_negative, default=400,
                   help="reference-right prompts to analyse, drawn by relation from the screening (0: no screening; "
                        "the analyses then use the random facts)")
    p.add_argument("--screen-facts", type=_count_or_all, default=3000,
                   help="ParaRel facts screened with the reference for known prompts, or 'all'")
    p.add_argument("--ppl-tokens", type=_positive, default=16384)
    p.add_argument("--ppl-window", type=_positive, default=512)
    p.add_argument("--calib-samples", type=_positive, default=64)
    p.add_argument("--calib-len", type=_positive, default=512)
    p.add_argument("--data", default=None, help="data folder (default: $QDIAG_DATA, cache, download, probe set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, type=Path, help="output folder")


# Old subcommand names, kept for one release.
ALIASES = {"lens": ["trace"], "causal": ["patch"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdiag", description="Why does a quantized LLM fail?")
    parser.add_argument("--version", action="version", version=f"qdiag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, aliases=ALIASES.get(name, []))
        common_options(p)
        p.set_defaults(func=func)
        return p

    cliff = command("cliff", "perplexity and factual recall across bit widths", cmd_cliff)
    cliff.add_argument("--generations", type=int, default=4, help="prompts to show greedy continuations for")

    lens = command("lens", "logit lens: the answer's probability and rank at every layer", cmd_lens)
    lens.add_argument("--no-final-norm", dest="final_norm", action="store_false",
                      help="unembed the raw residual stream (default: apply the final norm first)")
    lens.add_argument("--batch-size", type=_positive, default=16)

    ca = command("causal", "cross-model activation patching, zero ablation, clean-signal injection", cmd_causal)
    ca.add_argument("--positions", type=_csv(str), default=["last_subject", "last"],
                    help="tokens to patch: last_subject, last")
    ca.add_argument("--sites", type=_csv(str), default=["resid", "attn", "mlp"], help="resid, attn, mlp")
    ca.add_argument("--window", type=_positive, default=1, help="consecutive layers patched together")
    ca.add_argument("--no-ablation", dest="ablation", action="store_false")
    ca.add_argument("--no-injection", dest="injection", action="store_false")
    ca.add_argument("--batch-size", type=_positive, default=8)

    comp = command("components", "attention entropy / JSD, MLP gate flips, neuron overlap, MLP cosine",
                   cmd_components)
    comp.add_argument("--positions", type=_csv(str), default=["last_subject", "last"],
                      help="query tokens: last_subject, last, all (comma-separated)")
    comp.add_argument("--top-fraction", type=float, default=0.01, help="share of top neurons for the Jaccard")
    comp.add_argument("--batch-size", type=_positive, default=16)

    rep = command("representations", "CKA, principal-subspace similarity, error alignment", cmd_representations)
    rep.add_argument("--position", default="all", help="tokens: last_subject, last or all")
    rep.add_argument("--k", type=_positive, default=50, help="principal directions")
    rep.add_argument("--max-tokens", type=_positive, default=2048, help="token rows per layer")
    rep.add_argument("--batch-size", type=_positive, default=16)

    se = command("sensitivity", "quantize one layer / weight type / prefix at a time", cmd_sensitivity)
    se.add_argument("--scopes", type=_csv(str), default=["layer", "weight_type", "prefix"],
                    help="layer, weight_type, prefix")

    re_ = command("repair", "training-free repairs against uniform quantization at equal bits", cmd_repair)
    re_.add_argument("--protect-k", type=_csv(int), default=[1, 2], help="first layers kept at 8 bits")
    re_.add_argument("--kurtosis", type=_csv(float), default=[], help="excess-kurtosis thresholds for protection")
    re_.add_argument("--granularity", choices=["matrix", "channel"], default="matrix")
    re_.add_argument("--eora-ranks", type=_csv(int), default=[], help="ranks of the low-rank compensation")
    re_.add_argument("--alphas", type=_csv(float), default=None, help="amplification weights to choose from")
    re_.add_argument("--inject-layer", type=int, default=None, help="also try clean-signal injection at this layer")
    re_.add_argument("--held-out", type=float, default=0.5, help="share of facts used to choose amplification")
    di = command("diagnose", "the verdict: Signal Degradation or Computation Collapse, with its evidence", cmd_diagnose)
    di.add_argument("--evidence", choices=["full", "triage"], default="full",
                    help="triage: only what one forward per configuration gives (no patching, ablation, injection)")
    di.add_argument("--max-prompts", type=_positive, default=None, help="at most this many reference-right prompts")
    di.add_argument("--max-tokens", type=_positive, default=2048, help="token rows for the representation probes")
    di.add_argument("--batch-size", type=_positive, default=16)
    di.add_argument("--try-remedy", action="store_true", help="apply the suggested weight repairs and diagnose again")
    di.set_defaults(ppl_tokens=2048, default_bits=[8, 4, 3, 2])

    sw = sub.add_parser("sweep", help="a manifest of models x methods x widths x analyses, run as jobs on Ray")
    sw.add_argument("manifest", type=Path, help="YAML or JSON manifest (see the README)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.add_argument("--check", action="store_true", help="check the manifest and list its jobs; run nothing")
    sw.add_argument("--summary", action="store_true",
                    help="print the finished jobs' verdicts and key numbers side by side (also OUT/summary.csv)")
    sw.set_defaults(func=cmd_sweep)
    return parser


def setup(args: argparse.Namespace, calibrate: bool = False, ppl: bool = True):
    """Load what every analysis needs, with the shared options (calibration text when GPTQ or
    ``calibrate`` asks for it; perplexity text when ``ppl``)."""
    from .experiment import prepare
    from .measure.screen import describe

    calibrate = calibrate or any(s.method in CALIBRATED for s in _specs(args))
    exp = prepare(args.model, n_facts=args.facts, known=args.known, screen_facts=args.screen_facts,
                  progress=not args.quiet, ppl_tokens=args.ppl_tokens if ppl else 0,
                  calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, data_root=args.data,
                  device=args.device, dtype=args.dtype, calibrate=calibrate, device_map=args.device_map,
                  max_memory=args.max_memory)
    if not args.quiet:
        print(describe(exp.screening), file=sys.stderr)
    return exp


def meta(args: argparse.Namespace, **extra) -> dict:
    """What the run was: options, versions and machine, stored beside the rows."""
    from .report.meta import meta as run_meta

    return run_meta(vars(args), **extra)


def _facts(exp) -> dict:
    """What the analysis ran on, for its meta: how many facts, and what the screening found."""
    return {"n_facts": len(exp.analysed), "screening": exp.screening}


def _specs(args: argparse.Namespace, quantized: bool = False) -> list:
    """The --bits x --method configurations, checked now (and the checkpoints' files found), before
    the model loads."""
    from .measure.widths import quantized_only
    from .quant.plan import width_specs

    if args.bits is None:
        args.bits = [16] if args.quantized else getattr(args, "default_bits", [16, 8, 4, 3, 2])
    from .quant.checkpoint import is_hub_id

    missing = [p for p in args.quantized if not Path(p).exists() and not is_hub_id(p)]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {missing[0]} (a .gguf file, a checkpoint folder, or a hub id "
                                "org/name or org/name/file.gguf)")
    specs = width_specs(args.bits, args.method, args.group_size, args.sym)
    return quantized_only(specs) if quantized and not args.quantized else specs


def _configs(args: argparse.Namespace, exp, quantized: bool = False) -> list:
    """The configurations to analyse: the --bits x --method specs, then each --quantized checkpoint
    read against the loaded model (refused there if it does not fit)."""
    from .measure.widths import checkpoint_width, distinct_labels, quantized_only

    configs = distinct_labels(_specs(args) + [checkpoint_width(exp.model, p, progress=not args.quiet)
                                              for p in args.quantized])
    for w in configs[len(configs) - len(args.quantized):]:
        if not args.quiet:
            print(w.checkpoint.describe(), file=sys.stderr)
    return quantized_only(configs) if quantized else configs


def cmd_cliff(args: argparse.Namespace) -> None:
    from .analyses.cliff import run_cliff, save_cliff

    _specs(args)  # bad options fail here, before the model loads
    exp = setup(args)
    specs = _configs(args, exp)
    res = run_cliff(exp.model, exp.facts, specs, exp.ppl_tokens, args.ppl_window, exp.calib, args.generations,
                    args.seed, progress=not args.quiet, known=exp.known)
    save_cliff(res, args.out, meta(args, n_facts=len(exp.facts), ppl_tokens=int(exp.ppl_tokens.numel()),
                                   screening=exp.screening),
               title=f"{args.model}: the cliff")
    print(res.rows[["method", "bits", "avg_bits", "ppl", "acc_any", "acc_majority", "acc_all",
                    "median_rank"]].to_string(index=False))


def cmd_lens(args: argparse.Namespace) -> None:
    from .analyses.lens import run_lens, save_lens

    _specs(args)  # bad options fail here, before the model loads
    exp = setup(args, ppl=False)
    specs = _configs(args, exp)
    res = run_lens(exp.model, exp.analysed, specs, exp.calib, args.final_norm, args.batch_size, args.seed,
                   progress=not args.quiet)
    save_lens(res, args.out, meta(args, **_facts(exp)), title=args.model)
    last = res.rows[res.rows.layer == res.rows.layer.max()]
    print(last[["method", "bits", "model", "subset", "prob", "rank", "n"]].round(4).to_string(index=False))


def cmd_causal(args: argparse.Namespace) -> None:
    from .analyses.causal import check, run_causal, save_causal

    check(args.positions, args.sites, args.window)
    _specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = setup(args, ppl=False)
    specs = _configs(args, exp, quantized=True)
    res = run_causal(exp.model, exp.analysed, specs, exp.calib, args.positions, args.sites, args.window, args.ablation,
                     args.injection, args.batch_size, args.seed, progress=not args.quiet)
    save_causal(res, args.out, meta(args, **_facts(exp)), title=args.model)
    p = res.patching
    print(p[p.subset == "all"].groupby(["method", "bits", "site", "position"], sort=False).recovery.max()
          .round(3).to_string())


def cmd_components(args: argparse.Namespace) -> None:
    from .analyses.components import check, run_components, save_components
    from .core.arch import resolve

    check(args.positions, args.top_fraction)
    _specs(args)  # bad options fail here, before the model loads
    exp = setup(args, ppl=False)
    specs = _configs(args, exp)
    rows = run_components(exp.model, exp.analysed, specs, exp.calib, args.positions, args.top_fraction,
                          args.batch_size, progress=not args.quiet)
    save_components(rows, args.out, meta(args, **_facts(exp)), gated=resolve(exp.model).gated,
                    title=args.model)
    layer_rows = rows[rows["head"].isna()]
    print(layer_rows.groupby(["method", "bits", "position"], sort=False)[
        ["attn_entropy_fp", "attn_entropy", "attn_jsd", "gate_sfr", "neuron_jaccard", "mlp_cosine"]].mean()
        .round(3).to_string())


def cmd_representations(args: argparse.Namespace) -> None:
    from .analyses.representations import check, run_representations, save_representations

    check(args.position, args.k, args.max_tokens)
    _specs(args)  # bad options fail here, before the model loads
    exp = setup(args, ppl=False)
    specs = _configs(args, exp)
    res = run_representations(exp.model, exp.analysed, specs, exp.calib, args.position, args.k, args.max_tokens,
                              args.batch_size, progress=not args.quiet)
    save_representations(res, args.out, meta(args, **_facts(exp)), title=args.model)
    print(res.rows.groupby(["method", "bits"], sort=False)[["subspace_sim", "error_alignment", "cka_same_layer"]]
          .mean().round(3).to_string())


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from .analyses.sensitivity import check, first_domino, run_sensitivity, save_sensitivity

    check(args.scopes)
    _specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = setup(args)
    specs = _configs(args, exp, quantized=True)
    res = run_sensitivity(exp.model, exp.analysed, specs, exp.calib, args.scopes, exp.ppl_tokens, args.ppl_window,
                          args.seed, progress=not args.quiet)
    save_sensitivity(res, args.out, meta(args, **_facts(exp)), title=args.model)
    print(res.rows[["method", "bits", "scope", "target", "avg_bits", "robust_acc", "failure_acc", "ppl"]]
          .round(3).to_string(index=False))
    print(first_domino(res.rows))


def cmd_repair(args: argparse.Namespace) -> None:
    from .analyses.repair import check, run_repair, save_repair
    from .measure.amplify import ALPHAS

    check(args.eora_ranks, args.held_out, args.inject_layer)
    _specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = setup(args, calibrate=bool(args.eora_ranks))
    specs = _configs(args, exp, quantized=True)
    res = run_repair(exp.model, exp.analysed, specs, exp.calib, exp.ppl_tokens, args.ppl_window, args.protect_k,
                     args.kurtosis, args.granularity, args.eora_ranks, args.alphas or ALPHAS, args.inject_layer,
                     args.held_out, args.seed, progress=not args.quiet)
    save_repair(res, args.out, meta(args, **_facts(exp)), title=args.model)
    shown = ["method", "bits", "repair", "params", "avg_bits", "failure_acc", "robust_acc", "ppl",
             "baseline_avg_bits", "baseline_failure_acc", "baseline_robust_acc", "baseline_ppl"]
    print(res.rows[[c for c in shown if c in res.rows]].round(3).to_string(index=False))


def cmd_diagnose(args: argparse.Namespace) -> None:
    from .diagnosis import diagnose

    _specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = setup(args, calibrate=args.try_remedy)
    specs = _configs(args, exp, quantized=True)
    res = diagnose(exp.model, exp.analysed, specs, exp.calib, exp.ppl_tokens, args.ppl_window,
                   causal=args.evidence == "full", batch_size=args.batch_size, max_prompts=args.max_prompts,
                   max_tokens=args.max_tokens, try_remedy=args.try_remedy, seed=args.seed, progress=not args.quiet)
    res.meta = meta(args, **_facts(exp), **res.meta)
    res.save(args.out, title=args.model)
    print(res.verdicts[["method", "bits", "group_size", "avg_bits", "verdict", "score", "score_lo", "score_hi",
                        "lost"]].round(3).to_string(index=False))


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    manifest = sweep.read(args.manifest)
    todo = [j for j in manifest.jobs if not sweep.finished(j, manifest.out)]
    print(f"{len(manifest.jobs)} jobs, {len(manifest.jobs) - len(todo)} finished before, results in {manifest.out}",
          file=sys.stderr)
    if args.check:
        for j in manifest.jobs:
            print(" ".join(["qdiag", *j.command()]))
        return 0
    if args.summary:
        from .core.io import write_csv

        table = sweep.collect(manifest)
        if table.empty:
            print("no finished job with a summary (diagnose, cliff) yet", file=sys.stderr)
            return 1
        write_csv(manifest.out / "summary.csv", table)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        return 0
    summary = sweep.run(manifest, progress=not args.quiet)
    for f in summary["failed"]:
        print(f"failed: {f['job']}: {f['error']}", file=sys.stderr)
    print(f"done {len(summary['done'])}, skipped {summary['skipped']}, failed {len(summary['failed'])}",
          file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"qdiag {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
