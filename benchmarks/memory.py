"""Peak memory of a quantize-evaluate-restore cycle, as a ratio to the model's weight bytes.

Each measurement runs in its own process (peak RSS only grows): ``baseline`` loads the model and
evaluates it; ``rtn`` / ``gptq`` do the same, then quantize, evaluate quantized, restore and
evaluate again; ``deepcopy`` keeps a quantized deep copy beside the model, for comparison. The
ratio is (peak - baseline peak) / weight bytes. On a GPU (``--device cuda``) the peak is
``torch.cuda.max_memory_allocated`` and the model may be a random-weight config (``--random``).

    python benchmarks/memory.py                 # the default model on the CPU
    python benchmarks/memory.py --device cuda --random llama-1b
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys

import torch

from qdiag.testing import REAL_SHAPES

RANDOM = REAL_SHAPES  # random-weight configs for GPU runs, where the default model cannot travel


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, args) -> dict:
    from qdiag.core import data
    from qdiag.core.arch import unwrap
    from qdiag.measure import evaluate as ev
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model

    if args.random:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(RANDOM[args.random])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        dtype = getattr(torch, args.dtype)
        with torch.device(args.device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
        model = hf
        tokens = torch.randint(0, config.vocab_size, (args.tokens,))
        calib = torch.randint(0, config.vocab_size, (args.calib_samples, args.calib_len))
    else:
        from qdiag.core.models import load_model

        model = load_model(args.model, device=args.device, dtype=args.dtype)
        hf = unwrap(model)
        tokens = data.text_tokens(model.tokenizer, data.load_text("test"), args.tokens)
        calib = data.calibration_tokens(model.tokenizer, args.calib_samples, args.calib_len)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    ev.perplexity(hf, tokens, args.window, batch_size=1)
    if mode == "baseline":
        return {"weight_bytes": weight_bytes, "peak": peak_bytes(args.device)}
    method = "gptq" if mode == "gptq" else "rtn"
    qw = quantize_model(model, uniform_plan(model, QuantSpec(bits=4, group_size=128, method=method)), calib,
                        progress=False)
    if mode == "deepcopy":
        twin = copy.deepcopy(hf)
        for name, q in qw.tensors.items():
            twin.get_submodule(name).weight.data = q.dequantize(hf.dtype).to(args.device)
        ev.perplexity(twin, tokens, args.window, batch_size=1)
    else:
        with qw.applied(model):
            ev.perplexity(hf, tokens, args.window, batch_size=1)
        ev.perplexity(hf, tokens, args.window, batch_size=1)
    return {"weight_bytes": weight_bytes, "peak": peak_bytes(args.device), "codes_bytes": qw.nbytes,
            "quant_seconds": qw.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", choices=sorted(RANDOM), help="a random-weight config instead of --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--modes", nargs="+", default=["rtn", "gptq", "deepcopy"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    passthrough = [a for a in sys.argv[1:] if a != "--modes" and a not in args.modes]
    results = {}
    for mode in ["baseline", *args.modes]:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode], capture_output=True,
                             text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline"]
    wb = base["weight_bytes"]
    print(f"model weights {wb / 2**20:.0f} MiB ({args.random or args.model}, {args.dtype}, {args.device}); "
          f"baseline peak {base['peak'] / 2**20:.0f} MiB")
    print("mode       extra peak / weight bytes   codes / weight bytes   quantize seconds")
    for mode in args.modes:
        r = results[mode]
        print(f"{mode:<10} {(r['peak'] - base['peak']) / wb:>24.3f}   {r['codes_bytes'] / wb:>20.3f}"
              f"   {r['quant_seconds']:>16.1f}")


if __name__ == "__main__":
    main()
