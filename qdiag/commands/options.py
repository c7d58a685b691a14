"""The options every analysis shares, their parsers, and what every command does first: check the
configurations, load the model and data, read the checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.models import DEFAULT_MODEL
from ..quant.quantize import CALIBRATED, METHODS, parse_bits


def csv_of(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def group_size(text: str) -> int | None:
    if text.lower() in ("none", "channel", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'channel', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be at least 1, got {value}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bits_arg(text: str):
    try:
        return parse_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return value


def count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    return positive(text)


def method_arg(text: str) -> str:
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
    p.add_argument("--bits", type=csv_of(bits_arg), default=None,
                   help="e.g. 16,8,4,3,2 (16 = FP); default 16,8,4,3,2, or only 16 with --quantized")
    p.add_argument("--method", type=csv_of(method_arg), default=["rtn", "gptq"],
                   help="rtn, gptq, hqq, awq and/or llama.cpp types (q4_0, q4_1, q5_0, q5_1, q8_0, tq1_0, tq2_0, "
                        "mxfp4), comma-separated; a llama.cpp type fixes its own width")
    p.add_argument("--quantized", type=csv_of(str), default=[],
                   help="existing quantized checkpoints of --model (.gguf files; GPTQ, AWQ, compressed-tensors "
                        "folders; or hub ids org/name, org/name/file.gguf), comma-separated: analysed next to the "
                        "--bits/--method configurations")
    p.add_argument("--group-size", type=group_size, default=128, help="integer, or 'channel'")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--facts", type=positive, default=200,
                   help="random ParaRel facts, spread over relations (the cliff's recall)")
    p.add_argument("--known", type=non_negative, default=400,
                   help="reference-right prompts to analyse, drawn by relation from the screening (0: no screening; "
                        "the analyses then use the random facts)")
    p.add_argument("--screen-facts", type=count_or_all, default=3000,
                   help="ParaRel facts screened with the reference for known prompts, or 'all'")
    p.add_argument("--ppl-tokens", type=positive, default=16384)
    p.add_argument("--ppl-window", type=positive, default=512)
    p.add_argument("--calib-samples", type=positive, default=64)
    p.add_argument("--calib-len", type=positive, default=512)
    p.add_argument("--data", default=None, help="data folder (default: $QDIAG_DATA, cache, download, probe set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def setup(args: argparse.Namespace, calibrate: bool = False, ppl: bool = True):
    """Load what every analysis needs, with the shared options (calibration text when GPTQ or
    ``calibrate`` asks for it; perplexity text when ``ppl``)."""
    from ..experiment import prepare
    from ..measure.screen import describe

    calibrate = calibrate or any(s.method in CALIBRATED for s in specs(args))
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
    from ..report.meta import meta as run_meta

    return run_meta(vars(args), **extra)


def facts_meta(exp) -> dict:
    """What the analysis ran on, for its meta: how many facts, and what the screening found."""
    return {"n_facts": len(exp.analysed), "screening": exp.screening}


def specs(args: argparse.Namespace, quantized: bool = False) -> list:
    """The --bits x --method configurations, checked now (and the checkpoints' files found), before
    the model loads."""
    from ..measure.widths import quantized_only
    from ..quant.checkpoint import is_hub_id
    from ..quant.plan import width_specs

    if args.bits is None:
        args.bits = [16] if args.quantized else getattr(args, "default_bits", [16, 8, 4, 3, 2])

    missing = [p for p in args.quantized if not Path(p).exists() and not is_hub_id(p)]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {missing[0]} (a .gguf file, a checkpoint folder, or a hub id "
                                "org/name or org/name/file.gguf)")
    found = width_specs(args.bits, args.method, args.group_size, args.sym)
    return quantized_only(found) if quantized and not args.quantized else found


def configs(args: argparse.Namespace, exp, quantized: bool = False) -> list:
    """The configurations to analyse: the --bits x --method specs, then each --quantized checkpoint
    read against the loaded model (refused there if it does not fit)."""
    from ..measure.widths import checkpoint_width, distinct_labels, quantized_only

    # read and checked now, their weights read again one at a time as the analysis reaches them
    found = distinct_labels(specs(args) + [checkpoint_width(exp.model, p, progress=not args.quiet, lazy=True)
                                           for p in args.quantized])
    for w in found[len(found) - len(args.quantized):]:
        if not args.quiet:
            print(w.checkpoint.describe(), file=sys.stderr)
    return quantized_only(found) if quantized else found


