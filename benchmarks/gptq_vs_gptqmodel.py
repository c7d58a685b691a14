"""qdiag's GPTQ against GPTQModel (a maintained implementation), side by side in one run.

Both quantize the same de-quantized reference (the default model) with the same calibration:
group 128, symmetric, 64 x 512 tokens of WikiText-2 valid; both are scored by the same perplexity
function on WikiText-2 test. GPTQModel is a benchmark tool here, not a dependency:

    pip install gptqmodel       # in a separate environment is fine
    python benchmarks/gptq_vs_gptqmodel.py --bits 4 3

Prints, per width, perplexity and quantization seconds of each, and the two ratios the target is
stated in: ppl(qdiag) / ppl(GPTQModel) (target <= 1.01) and time(qdiag) / time(GPTQModel) (<= 0.5).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

# name: (true_sequential, calibration dtype, dampening, description)
VARIANTS = {
    "default": (True, None, 0.01, "true-sequential stages, calibration passes in the model's dtype"),
    "fast": (False, None, 0.01, "one stage per layer"),
    "bf16": (True, torch.bfloat16, 0.01, "true-sequential, calibration passes in bfloat16 (as GPTQModel on CPU)"),
    "bf16-fast": (False, torch.bfloat16, 0.01, "one stage per layer, bfloat16 passes"),
    "bf16-damp05": (True, torch.bfloat16, 0.05, "as bf16, with GPTQModel's dampening (0.05 instead of 0.01)"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=2, help="GPTQModel CPU workers (the machine's cores)")
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["default", "bf16"], choices=sorted(VARIANTS),
                    help="qdiag settings: " + "; ".join(f"{k}: {v[3]}" for k, v in VARIANTS.items()))
    args = ap.parse_args()
    os.environ.pop("QDIAG_QUANT_CACHE", None)  # time the quantization, not a cache lookup

    from qdiag.core import data
    from qdiag.core.arch import unwrap
    from qdiag.core.models import load_model
    from qdiag.measure import evaluate as ev
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model

    lm = load_model(args.model)
    tok = lm.tokenizer
    hf = unwrap(lm)
    calib = data.calibration_tokens(tok, args.calib_samples, args.calib_len, seed=0)
    tokens = data.text_tokens(tok, data.load_text("test"), args.ppl_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; calibration {tuple(calib.shape)}; "
          f"perplexity on {tokens.numel()} tokens")
    print(f"reference ppl {ev.perplexity(hf, tokens):.3f}", flush=True)

    results = {}
    for bits in args.bits:
        spec = QuantSpec(bits=bits, group_size=args.group_size, sym=True, method="gptq")
        for variant in args.variants:
            true_sequential, calib_dtype, damp, _ = VARIANTS[variant]
            t0 = time.perf_counter()
            qw = quantize_model(lm, uniform_plan(lm, spec), calib, batch_size=args.batch_size, progress=False,
                                true_sequential=true_sequential, calib_dtype=calib_dtype, damp=damp)
            seconds = time.perf_counter() - t0
            with qw.applied(lm):
                ppl = ev.perplexity(hf, tokens)
            results[(f"qdiag-{variant}", bits)] = (ppl, seconds)
            print(f"qdiag-{variant:<9} w{bits}: ppl {ppl:.3f}  quantize {seconds:.1f} s", flush=True)

    if not args.skip_gptqmodel:
        import gptqmodel

        gptqmodel._default_cpu_workers = lambda: args.workers  # before it builds its pool
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)  # GPTQModel writes a logs/ folder into the working directory
            ref_dir = os.path.join(tmp, "reference")
            save_reference(hf, tok, ref_dir)
            rows = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in calib.tolist()]
            for bits in args.bits:
                cfg = QuantizeConfig(bits=bits, group_size=args.group_size, sym=True)
                model = GPTQModel.load(ref_dir, cfg, device="cpu")
                t0 = time.perf_counter()
                model.quantize(rows, batch_size=args.batch_size, backend=BACKEND.TORCH)
                seconds = time.perf_counter() - t0
                out_dir = os.path.join(tmp, f"w{bits}")
                model.save(out_dir)
                del model
                qmodel = GPTQModel.load(out_dir, device="cpu", backend=BACKEND.TORCH)
                ppl = ev.perplexity(dequantized_copy(qmodel.model, ref_dir), tokens)
                results[("gptqmodel", bits)] = (ppl, seconds)
                print(f"gptqmodel w{bits}: ppl {ppl:.3f}  quantize {seconds:.1f} s "
                      f"(damp {cfg.damp_percent}, act_group_aware {cfg.act_group_aware}, "
                      f"true_sequential {cfg.true_sequential})", flush=True)
                del qmodel
            os.chdir(cwd)

        if not args.variants:
            return
        print("\nqdiag / GPTQModel      bits  ppl ratio (target <= 1.01)  time ratio (target <= 0.5)")
        for variant in args.variants:
            for bits in args.bits:
                (pq, tq), (pg, tg) = results[(f"qdiag-{variant}", bits)], results[("gptqmodel", bits)]
                print(f"{variant:<22} {bits:>4}  {pq / pg:>26.4f}  {tq / tg:>26.3f}")


def dequantized_copy(qmodel, ref_dir: str):
    """The reference model with GPTQModel's de-quantized weights copied in: the same numbers as
    its own kernels compute, scored with plain float matmuls (its CPU kernels are slow to run)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    for name, module in qmodel.named_modules():
        if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
            target = plain.get_submodule(name)
            # GPTQ packs along the inputs: de-quantized weights come out (in, out)
            target.weight.data.copy_(module.dequantize_weight().float().t())
    return plain


def save_reference(hf, tok, path: str) -> None:
    """Save the de-quantized float model as a plain Hugging Face folder (a GGUF-loaded model
    refuses save_pretrained), so that GPTQModel starts from exactly the same weights."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(path)
    tok.save_pretrained(path)


if __name__ == "__main__":
    main()
