"""Every analysis on a random-weight model of a real size (default: Llama-3.1-8B's shapes, bfloat16)
on one GPU: seconds and peak GPU memory of each, the peak as a ratio to the model's weight bytes.

The default model cannot travel to the GPU machines here, and no hub is reachable; a random model
with the same shapes costs the same. Its facts are prompts it answers itself (as in the tests), so
the numbers are about cost, not about quantization. Run from the repository root:

    python benchmarks/gpu_scale.py --random llama-8b [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qdiag.testing import REAL_SHAPES as RANDOM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", default="llama-8b", choices=sorted(RANDOM))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--only", nargs="*", default=None, help="analyses whose names start with these words")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from qdiag.analyses.causal import run_causal
    from qdiag.analyses.cliff import run_cliff
    from qdiag.analyses.components import run_components
    from qdiag.analyses.lens import run_lens
    from qdiag.analyses.repair import run_repair
    from qdiag.analyses.representations import run_representations
    from qdiag.analyses.sensitivity import run_sensitivity
    from qdiag.core.models import wrap
    from qdiag.diagnosis import diagnose
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model
    from qdiag.testing import known_facts, tiny_tokenizer

    cfg = dict(RANDOM[args.random])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval().requires_grad_(False)
    tok = tiny_tokenizer()
    hf.lm_head.weight[len(tok):] = 0  # ids the tokenizer does not have are never the top prediction
    model = wrap(hf, tok)
    facts = known_facts(hf, tok)
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    vocab = len(tok)
    ppl = torch.randint(4, vocab, (args.ppl_tokens,))
    calib = torch.randint(4, vocab, (args.calib_samples, args.calib_len))
    specs = [QuantSpec(16), QuantSpec(4, 128, method="rtn"), QuantSpec(2, 128, method="rtn")]
    q2 = specs[2]
    print(f"{args.random} ({args.dtype}): {weights / 2**30:.1f} GiB of weights, {len(facts)} facts it answers, "
          f"{torch.cuda.get_device_name()}", flush=True)

    runs = {
        "gptq 4-bit (quantize only)": lambda: quantize_model(
            model, uniform_plan(model, QuantSpec(4, 128, method="gptq")), calib, progress=False),
        "cliff (16/4/2, ppl + recall)": lambda: run_cliff(model, facts, specs, ppl, 512, calib, n_generations=2,
                                                          progress=False),
        "logit lens": lambda: run_lens(model, facts, specs, calib, progress=False),
        "patching + ablation + injection": lambda: run_causal(model, facts, specs[1:], calib, progress=False),
        "components": lambda: run_components(model, facts, specs, calib, progress=False),
        "representations": lambda: run_representations(model, facts, specs, calib, k=50, progress=False),
        "sensitivity (2-bit)": lambda: run_sensitivity(model, facts, [q2], calib, ppl_tokens=ppl[:1024],
                                                       progress=False),
        "repair (2-bit, protect 2, EoRA r16)": lambda: run_repair(model, facts, [q2], calib, ppl[:1024], 512,
                                                                 protect_k=(2,), eora_ranks=(16,), progress=False),
        "diagnose (4/2-bit, full evidence)": lambda: diagnose(model, facts, specs[1:], calib, ppl[:2048],
                                                              progress=False),
    }
    table = []
    print(f"{'analysis':<40} {'seconds':>8} {'peak / weights':>15}")
    for name, fn in runs.items():
        if args.only and not any(name.startswith(w) for w in args.only):
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        ratio = torch.cuda.max_memory_allocated() / weights
        table.append({"analysis": name, "seconds": round(seconds, 1), "peak_over_weights": round(ratio, 3)})
        print(f"{name:<40} {seconds:>8.1f} {ratio:>15.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.random, "dtype": args.dtype, "facts": len(facts),
                                        "weight_bytes": weights, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
