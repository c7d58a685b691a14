"""The study's seven analyses on the command line: each subcommand named as its module, its notebook
and its result file (``qdiag cliff``, ``lens``, ``causal``, ``components``, ``representations``,
``sensitivity``, ``repair``)."""

from __future__ import annotations

import argparse

from . import options as o


def register(command) -> None:
    """Add the analyses' subcommands through ``command(name, help, func)``, which adds the shared options."""
    cliff = command("cliff", "perplexity and factual recall across bit widths", cmd_cliff)
    cliff.add_argument("--generations", type=int, default=4, help="prompts to show greedy continuations for")

    lens = command("lens", "logit lens: the answer's probability and rank at every layer", cmd_lens)
    lens.add_argument("--no-final-norm", dest="final_norm", action="store_false",
                      help="unembed the raw residual stream (default: apply the final norm first)")
    lens.add_argument("--batch-size", type=o.positive, default=16)

    ca = command("causal", "cross-model activation patching, zero ablation, clean-signal injection", cmd_causal)
    ca.add_argument("--positions", type=o.csv_of(str), default=["last_subject", "last"],
                    help="tokens to patch: last_subject, last")
    ca.add_argument("--sites", type=o.csv_of(str), default=["resid", "attn", "mlp"], help="resid, attn, mlp")
    ca.add_argument("--window", type=o.positive, default=1, help="consecutive layers patched together")
    ca.add_argument("--no-ablation", dest="ablation", action="store_false")
    ca.add_argument("--no-injection", dest="injection", action="store_false")
    ca.add_argument("--batch-size", type=o.positive, default=8)

    comp = command("components", "attention entropy / JSD, MLP gate flips, neuron overlap, MLP cosine",
                   cmd_components)
    comp.add_argument("--positions", type=o.csv_of(str), default=["last_subject", "last"],
                      help="query tokens: last_subject, last, all (comma-separated)")
    comp.add_argument("--top-fraction", type=float, default=0.01, help="share of top neurons for the Jaccard")
    comp.add_argument("--batch-size", type=o.positive, default=16)

    rep = command("representations", "CKA, principal-subspace similarity, error alignment", cmd_representations)
    rep.add_argument("--position", default="all", help="tokens: last_subject, last or all")
    rep.add_argument("--k", type=o.positive, default=50, help="principal directions")
    rep.add_argument("--max-tokens", type=o.positive, default=2048, help="token rows per layer")
    rep.add_argument("--batch-size", type=o.positive, default=16)

    se = command("sensitivity", "quantize one layer / weight type / prefix at a time", cmd_sensitivity)
    se.add_argument("--scopes", type=o.csv_of(str), default=["layer", "weight_type", "prefix"],
                    help="layer, weight_type, prefix")

    re_ = command("repair", "training-free repairs against uniform quantization at equal bits", cmd_repair)
    re_.add_argument("--protect-k", type=o.csv_of(int), default=[1, 2], help="first layers kept at 8 bits")
    re_.add_argument("--kurtosis", type=o.csv_of(float), default=[], help="excess-kurtosis thresholds for protection")
    re_.add_argument("--granularity", choices=["matrix", "channel"], default="matrix")
    re_.add_argument("--eora-ranks", type=o.csv_of(int), default=[], help="ranks of the low-rank compensation")
    re_.add_argument("--alphas", type=o.csv_of(float), default=None, help="amplification weights to choose from")
    re_.add_argument("--inject-layer", type=int, default=None, help="also try clean-signal injection at this layer")
    re_.add_argument("--held-out", type=float, default=0.5, help="share of facts used to choose amplification")


def cmd_cliff(args: argparse.Namespace) -> None:
    from ..analyses.cliff import run_cliff, save_cliff

    o.specs(args)  # bad options fail here, before the model loads
    exp = o.setup(args)
    specs = o.configs(args, exp)
    res = run_cliff(exp.model, exp.facts, specs, exp.ppl_tokens, args.ppl_window, exp.calib, args.generations,
                    args.seed, progress=not args.quiet, known=exp.known)
    save_cliff(res, args.out, o.meta(args, n_facts=len(exp.facts), ppl_tokens=int(exp.ppl_tokens.numel()),
                                   screening=exp.screening),
               title=f"{args.model}: the cliff")
    print(res.rows[["method", "bits", "avg_bits", "ppl", "acc_any", "acc_majority", "acc_all",
                    "median_rank"]].to_string(index=False))


def cmd_lens(args: argparse.Namespace) -> None:
    from ..analyses.lens import run_lens, save_lens

    o.specs(args)  # bad options fail here, before the model loads
    exp = o.setup(args, ppl=False)
    specs = o.configs(args, exp)
    res = run_lens(exp.model, exp.analysed, specs, exp.calib, args.final_norm, args.batch_size, args.seed,
                   progress=not args.quiet)
    save_lens(res, args.out, o.meta(args, **o.facts_meta(exp)), title=args.model)
    last = res.rows[res.rows.layer == res.rows.layer.max()]
    print(last[["method", "bits", "model", "subset", "prob", "rank", "n"]].round(4).to_string(index=False))


def cmd_causal(args: argparse.Namespace) -> None:
    from ..analyses.causal import check, run_causal, save_causal

    check(args.positions, args.sites, args.window)
    o.specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = o.setup(args, ppl=False)
    specs = o.configs(args, exp, quantized=True)
    res = run_causal(exp.model, exp.analysed, specs, exp.calib, args.positions, args.sites, args.window, args.ablation,
                     args.injection, args.batch_size, args.seed, progress=not args.quiet)
    save_causal(res, args.out, o.meta(args, **o.facts_meta(exp)), title=args.model)
    p = res.patching
    print(p[p.subset == "all"].groupby(["method", "bits", "site", "position"], sort=False).recovery.max()
          .round(3).to_string())


def cmd_components(args: argparse.Namespace) -> None:
    from ..analyses.components import check, run_components, save_components
    from ..core.arch import resolve

    check(args.positions, args.top_fraction)
    o.specs(args)  # bad options fail here, before the model loads
    exp = o.setup(args, ppl=False)
    specs = o.configs(args, exp)
    rows = run_components(exp.model, exp.analysed, specs, exp.calib, args.positions, args.top_fraction,
                          args.batch_size, progress=not args.quiet)
    save_components(rows, args.out, o.meta(args, **o.facts_meta(exp)), gated=resolve(exp.model).gated,
                    title=args.model)
    layer_rows = rows[rows["head"].isna()]
    print(layer_rows.groupby(["method", "bits", "position"], sort=False)[
        ["attn_entropy_fp", "attn_entropy", "attn_jsd", "gate_sfr", "neuron_jaccard", "mlp_cosine"]].mean()
        .round(3).to_string())


def cmd_representations(args: argparse.Namespace) -> None:
    from ..analyses.representations import check, run_representations, save_representations

    check(args.position, args.k, args.max_tokens)
    o.specs(args)  # bad options fail here, before the model loads
    exp = o.setup(args, ppl=False)
    specs = o.configs(args, exp)
    res = run_representations(exp.model, exp.analysed, specs, exp.calib, args.position, args.k, args.max_tokens,
                              args.batch_size, progress=not args.quiet)
    save_representations(res, args.out, o.meta(args, **o.facts_meta(exp)), title=args.model)
    print(res.rows.groupby(["method", "bits"], sort=False)[["subspace_sim", "error_alignment", "cka_same_layer"]]
          .mean().round(3).to_string())


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from ..analyses.sensitivity import check, first_domino, run_sensitivity, save_sensitivity

    check(args.scopes)
    o.specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = o.setup(args)
    specs = o.configs(args, exp, quantized=True)
    res = run_sensitivity(exp.model, exp.analysed, specs, exp.calib, args.scopes, exp.ppl_tokens, args.ppl_window,
                          args.seed, progress=not args.quiet)
    save_sensitivity(res, args.out, o.meta(args, **o.facts_meta(exp)), title=args.model)
    print(res.rows[["method", "bits", "scope", "target", "avg_bits", "robust_acc", "failure_acc", "ppl"]]
          .round(3).to_string(index=False))
    print(first_domino(res.rows))


def cmd_repair(args: argparse.Namespace) -> None:
    from ..analyses.repair import check, run_repair, save_repair
    from ..measure.amplify import ALPHAS

    check(args.eora_ranks, args.held_out, args.inject_layer)
    o.specs(args, quantized=True)  # bad options fail here, before the model loads
    exp = o.setup(args, calibrate=bool(args.eora_ranks))
    specs = o.configs(args, exp, quantized=True)
    res = run_repair(exp.model, exp.analysed, specs, exp.calib, exp.ppl_tokens, args.ppl_window, args.protect_k,
                     args.kurtosis, args.granularity, args.eora_ranks, args.alphas or ALPHAS, args.inject_layer,
                     args.held_out, args.seed, progress=not args.quiet)
    save_repair(res, args.out, o.meta(args, **o.facts_meta(exp)), title=args.model)
    shown = ["method", "bits", "repair", "params", "avg_bits", "failure_acc", "robust_acc", "ppl",
             "baseline_avg_bits", "baseline_failure_acc", "baseline_robust_acc", "baseline_ppl"]
    print(res.rows[[c for c in shown if c in res.rows]].round(3).to_string(index=False))
