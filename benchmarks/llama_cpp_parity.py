"""qdiag's KL divergence and top-1 agreement for llama.cpp files, beside the numbers llama.cpp itself
reports for the same files (``llama-perplexity --kl-divergence``), on the same WikiText-2 tokens.

    python benchmarks/llama_cpp_parity.py [--chunks 16] [--ctx 512] [--out results/parity]

Needs llama.cpp's tools (``QDIAG_LLAMA_CPP``; ``benchmarks/llama_cpp_build.py`` builds them). The
files are ``qdiag.fixtures.llama_cpp_files("smollm2")``; the base is their float file, the
reference qdiag loads. Three columns per file:

- llama.cpp: ``llama-perplexity -m FILE --kl-divergence-base BASE --kl-divergence`` (chunks of
  ``--ctx`` tokens, the second half of each scored, the base's log-probabilities stored in 16 bits);
- qdiag, same protocol: qdiag's own forward of the base and of the file (read as a checkpoint of
  the reference) on the very tokens llama.cpp scored (read from its KL base file), same chunks and
  scored positions;
- qdiag, same protocol, with llama.cpp's activation rounding emulated: llama.cpp's CPU kernels
  multiply a quantized matrix with its input rounded to 8 bits (``Q8_0`` blocks of 32 for the legacy
  types and IQ4_NL, ``Q8_K`` blocks of 256 for the k-quants and the other i-quants); qdiag
  simulates weight-only quantization and rounds nothing else, so this column shows how much of the
  difference that rounding is;
- qdiag, its own protocol: non-overlapping 512-token windows of qdiag's tokenization of the text,
  every token after the first scored (what ``qdiag cliff`` and ``diagnose`` report).

The first row is the float file against its own base: llama.cpp's floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from qdiag import fixtures
from qdiag.core.arch import resolve, unwrap
from qdiag.core.data import load_text, text_tokens
from qdiag.core.io import write_csv
from qdiag.core.models import load_model
from qdiag.measure import evaluate as ev
from qdiag.measure.widths import checkpoint_width
from qdiag.quant import llama_cpp

TYPES = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_S", "IQ2_XXS")
Q8_0_INPUTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4")  # the rest take Q8_K inputs


def _rounded_inputs(block: int):
    def pre(module, args):
        x = args[0]
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        d = xb.abs().amax(-1, keepdim=True) / 127
        d = torch.where(d == 0, torch.ones_like(d), d)
        return ((xb / d).round() * d).reshape(x.shape), *args[1:]
    return pre


def with_activation_rounding(model, width):
    """``width.applied`` with every quantized matrix's input rounded to 8 bits as llama.cpp's CPU
    kernels round it (a float matrix's input is left alone)."""
    hf = unwrap(model)

    @contextmanager
    def applied(m):
        handles = []
        for name in resolve(model).linear_names():
            kind = width.checkpoint.tensor_types[f"{name}.weight"]
            if kind in ("F32", "F16", "BF16"):
                continue
            block = 32 if kind in Q8_0_INPUTS else 256
            handles.append(hf.get_submodule(name).register_forward_pre_hook(_rounded_inputs(block)))
        try:
            with width.applied(m):
                yield m
        finally:
            for h in handles:
                h.remove()
    return applied


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16, help="llama-perplexity --chunks (of --ctx tokens)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/parity"))
    args = ap.parse_args()
    tools = llama_cpp.require()
    files = fixtures.llama_cpp_files("smollm2", tools)
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.out / "wiki.test.txt"
    text.write_text(load_text("test"))
    base_kld = args.out / "base.kld"
    common = ["-f", str(text), "-c", str(args.ctx), "--chunks", str(args.chunks), "-b", str(args.ctx)]
    t0 = time.perf_counter()
    base_out = llama_cpp.run(tools, "llama-perplexity", ["-m", str(files["F32"]), *common, "--kl-divergence-base",
                                                         str(base_kld)], threads=args.threads)
    base_ppl = llama_cpp.parse_perplexity(base_out)["ppl"]
    print(f"llama.cpp base: ppl {base_ppl:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    chunks, first = llama_cpp.read_kl_base(base_kld)
    model = load_model()
    from gguf import GGUFReader

    reader = GGUFReader(files["F32"])
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else False
    if add_bos:  # llama-perplexity puts BOS in each chunk's first place
        chunks[:, 0] = int(reader.fields["tokenizer.ggml.bos_token_id"].contents())
    ours = text_tokens(model.tokenizer, load_text("test"))
    n = min(ours.numel(), chunks.numel())
    same_tokens = float((ours[:n] == chunks.reshape(-1)[:n]).float().mean())
    own_tokens = ours[: args.chunks * args.ctx]
    rows = []
    for t in TYPES:
        t1 = time.perf_counter()
        out = llama_cpp.run(tools, "llama-perplexity", ["-m", str(files[t]), *common, "--kl-divergence-base",
                                                        str(base_kld), "--kl-divergence"], threads=args.threads)
        theirs = llama_cpp.parse_perplexity(out)
        w = checkpoint_width(model, str(files[t]))
        same = ev.output_fidelity(model, None, w.applied, windows=chunks, first=first)
        rounded = ev.output_fidelity(model, None, with_activation_rounding(model, w), windows=chunks, first=first)
        own = ev.output_fidelity(model, own_tokens, w.applied, window=args.ctx)
        w.release()
        rows.append({"file": t, "bpw": w.avg_bits, "kl_llama_cpp": theirs["kl"], "kl_llama_cpp_err": theirs["kl_err"],
                     "kl_qdiag": same["kl"],
                     "kl_rel_diff": same["kl"] / theirs["kl"] - 1 if theirs["kl"] > 0 else float("nan"),
                     "top1_llama_cpp": theirs["top1_agreement"], "top1_qdiag": same["top1_agreement"],
                     "top1_diff_points": 100 * (same["top1_agreement"] - theirs["top1_agreement"]),
                     "kl_qdiag_8bit_inputs": rounded["kl"],
                     "kl_rel_diff_8bit_inputs": rounded["kl"] / theirs["kl"] - 1 if theirs["kl"] > 0 else float("nan"),
                     "top1_qdiag_8bit_inputs": rounded["top1_agreement"],
                     "top1_diff_points_8bit_inputs": 100 * (rounded["top1_agreement"] - theirs["top1_agreement"]),
                     "ppl_llama_cpp": theirs["ppl"], "ppl_qdiag": same["ppl"],
                     "kl_qdiag_own_protocol": own["kl"], "top1_qdiag_own_protocol": own["top1_agreement"],
                     "seconds": round(time.perf_counter() - t1, 1)})
        print(pd.DataFrame(rows[-1:]).round(4).to_string(index=False), file=sys.stderr)
    table = pd.DataFrame(rows)
    write_csv(args.out / "parity.csv", table)
    print(f"tokens: {chunks.numel()} ({args.chunks} chunks of {args.ctx}, predictions {first}..{args.ctx - 2} of each "
          f"scored); qdiag's tokenization of the same text agrees with llama.cpp's on {same_tokens:.1%} of the first "
          f"{n} tokens; BOS added by llama.cpp: {add_bos}")
    shown = ["file", "bpw", "kl_llama_cpp", "kl_qdiag", "kl_rel_diff", "kl_qdiag_8bit_inputs",
             "kl_rel_diff_8bit_inputs", "top1_llama_cpp", "top1_qdiag", "top1_qdiag_8bit_inputs",
             "kl_qdiag_own_protocol"]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    q = table[table.file != "F32"]
    for suffix, what in (("", "weight-only"), ("_8bit_inputs", "with llama.cpp's 8-bit inputs emulated")):
        print(f"qdiag {what}: worst relative KL difference {q[f'kl_rel_diff{suffix}'].abs().max():.2%} (target 5%), "
              f"worst top-1 difference {q[f'top1_diff_points{suffix}'].abs().max():.2f} points (target 1)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
