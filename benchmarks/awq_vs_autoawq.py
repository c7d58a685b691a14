"""qdiag's AWQ against AutoAWQ (the reference implementation, archived in 2025), with RTN, HQQ and
GPTQ beside them, side by side in one run.

All quantize the same de-quantized reference (the default model) with the same calibration tokens
(AutoAWQ gets them as text, decoded from qdiag's token rows); group 64 with a zero point, because
AutoAWQ needs a group size that divides every matrix's inputs (576 = 9 x 64; 128 does not divide
it); all are scored by the same perplexity function on WikiText-2 test. AutoAWQ is a benchmark tool
here, not a dependency; it runs on a CPU from its source with a stub for ``datasets`` (it imports it
only to download calibration text, which is passed in here):

    pip install --no-deps --no-build-isolation autoawq==0.2.9
    python benchmarks/awq_vs_autoawq.py --bits 4 3

Prints, per width, perplexity and quantization seconds of each, and ppl(qdiag AWQ) / ppl(AutoAWQ).
AutoAWQ runs with ``export_compatible=True`` (scales and clipping applied to the float weights),
then its own pseudo-quantizer on every decoder matrix: the numbers its quantized model computes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import types

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--methods", nargs="*", default=["rtn", "hqq", "awq", "gptq"])
    ap.add_argument("--skip-autoawq", action="store_true")
    args = ap.parse_args()
    os.environ.pop("QDIAG_QUANT_CACHE", None)  # time the quantization, not a cache lookup

    from qdiag.core import data
    from qdiag.core.arch import resolve, unwrap
    from qdiag.core.models import load_model
    from qdiag.measure import evaluate as ev
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model

    lm = load_model()
    tok, hf = lm.tokenizer, unwrap(lm)
    calib = data.calibration_tokens(tok, args.calib_samples, args.calib_len, seed=0)
    tokens = data.text_tokens(tok, data.load_text("test"), args.ppl_tokens)
    reference = ev.perplexity(hf, tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; calibration {tuple(calib.shape)}; "
          f"perplexity on {tokens.numel()} tokens; reference ppl {reference:.3f}", flush=True)
    results = {}
    for bits in args.bits:
        for method in args.methods:
            spec = QuantSpec(bits, args.group_size, False, method)
            t0 = time.perf_counter()
            qw = quantize_model(lm, uniform_plan(lm, spec), calib, progress=False)
            seconds = time.perf_counter() - t0
            with qw.applied(lm):
                ppl = ev.perplexity(hf, tokens)
            results[(method, bits)] = (ppl, seconds)
            print(f"qdiag {method:<5} w{bits}: ppl {ppl:.3f}  quantize {seconds:.1f} s", flush=True)

    if not args.skip_autoawq:
        sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
        from awq import AutoAWQForCausalLM
        from transformers import AutoModelForCausalLM

        texts = [tok.decode(row) for row in calib.tolist()]
        names = resolve(lm).linear_names()
        with tempfile.TemporaryDirectory() as tmp:
            plain = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config))  # a GGUF-loaded model will not save
            plain.load_state_dict(hf.state_dict())
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for bits in args.bits:
                model = AutoAWQForCausalLM.from_pretrained(tmp, device_map="cpu")
                config = {"zero_point": True, "q_group_size": args.group_size, "w_bit": bits, "version": "GEMM"}
                t0 = time.perf_counter()
                model.quantize(tok, quant_config=config, calib_data=texts, max_calib_samples=len(texts),
                               max_calib_seq_len=args.calib_len, export_compatible=True)
                # scales and clipping applied in float, nothing rounded yet: a scale is undone by the
                # operation it is folded into, so this should stay near the reference (clipping aside)
                scaled = ev.perplexity(model.model.eval(), tokens)
                print(f"AutoAWQ     w{bits}: ppl with its scales and clipping applied, before rounding {scaled:.3f}",
                      flush=True)
                for name in names:
                    lin = model.model.get_submodule(name)
                    lin.weight.data = model.quantizer.pseudo_quantize_tensor(lin.weight.data)[0]
                seconds = time.perf_counter() - t0
                ppl = ev.perplexity(model.model.eval(), tokens)
                results[("autoawq", bits)] = (ppl, seconds)
                print(f"AutoAWQ     w{bits}: ppl {ppl:.3f}  quantize {seconds:.1f} s", flush=True)
                del model

    print("\nbits  method    ppl / reference   ppl / AutoAWQ")
    for bits in args.bits:
        base = results.get(("autoawq", bits), (float("nan"), 0))[0]
        for method in [*args.methods, "autoawq"]:
            if (method, bits) in results:
                ppl = results[(method, bits)][0]
                print(f"{bits:4d}  {method:<8} {ppl / reference:16.4f} {ppl / base:15.4f}")


if __name__ == "__main__":
    main()
