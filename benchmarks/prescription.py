"""The prescription proven at equal bytes: one table per model, every row re-measured.

    python benchmarks/prescription.py --model smollm2 [--out benchmarks/results]
    python benchmarks/prescription.py --model tiny-qwen2

Needs llama.cpp's tools (``QDIAG_LLAMA_CPP``; ``benchmarks/llama_cpp_build.py`` builds them). The
user's file is ``--start`` (Q2_K: llama-quantize's own mixture), written by llama-quantize from the
float file of the model. ``qdiag.prescribe`` measures it once; ``diagnosis.equal_bytes`` then puts
the prescription beside each alternative at the alternative's bytes (its docstring lists the rows)
and re-measures every row: KL to the reference and top-1 agreement on text, the share of the
reference's right answers lost (95% bootstrap interval), and the triage verdict of ``diagnose``
for the files. Writes ``prescription_<model>.csv`` and ``.md``.

Models: ``smollm2`` is the default model (text: WikiText-2 test; facts: ParaRel prompts it
answers right). ``tiny-qwen2`` is a second family: a randomly initialised Qwen2 of hidden size 256
(llama.cpp's k-quants need rows of 256), whose "facts" are its own greedy answers on the tiny
tokenizer's prompts and whose text is random token windows: it shows the method on another
family's tensors, not on knowledge a trained model holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qdiag import fixtures
from qdiag.core.io import atomic_write_bytes, write_csv
from qdiag.diagnosis import diagnose, equal_bytes
from qdiag.diagnosis.prescribe import prescribe
from qdiag.measure.widths import checkpoint_width
from qdiag.quant import llama_cpp


def _model(name: str, tools: Path):
    """``(model, facts, text, calibration windows, window, float file, folder)``."""
    if name == "smollm2":
        from qdiag.experiment import prepare

        exp = prepare("smollm2-135m", n_facts=0, known=300, screen_facts=3000, ppl_tokens=16 * 512,
                      calib_samples=16, calib_len=512, progress=True)
        f32 = fixtures.llama_cpp_files("smollm2", tools, types=())["F32"]
        return exp.model, exp.known, exp.ppl_tokens, exp.calib, 512, f32, f32.parent
    from qdiag.core.models import wrap
    from qdiag.testing import calib_ids, write_gguf

    hf, tok, facts = fixtures.tiny_knowing_model("qwen2")
    folder = fixtures.root() / "prescription" / "tiny-qwen2"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "F32.gguf"
    if not f32.exists():
        write_gguf(hf, tok, f32.with_suffix(".part"), "F32").replace(f32)
    return wrap(hf, tok), facts, calib_ids(16, 128, seed=1).flatten(), calib_ids(16, 128), 128, f32, folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-qwen2"])
    ap.add_argument("--start", default="Q2_K", help="the user's file: a llama-quantize type")
    ap.add_argument("--comparators", default=",".join(equal_bytes.COMPARATORS + ("pure-Q4_K",)))
    ap.add_argument("--random", type=int, default=2, help="random allocations per comparator")
    ap.add_argument("--kl-windows", type=int, default=2)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--diagnose", default="file,comparator,prescription",
                    help="the rows to diagnose (triage verdict), comma-separated; empty: none")
    ap.add_argument("--max-prompts", type=int, default=200, help="prompts the triage diagnoses")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    tools = llama_cpp.require()
    t0 = time.perf_counter()
    lm, facts, text, calib, window, f32, folder = _model(args.model, tools)
    start = checkpoint_width(lm, str(equal_bytes.llama_file(f32, args.start, folder, tools)))
    p = prescribe(lm, start, calib, "+0.25bpw", "llama.cpp", None, None, args.kl_windows, args.fisher_windows,
                  tools=tools, base_file=str(f32))
    print(p.report(), file=sys.stderr)
    rows = equal_bytes.alternatives(lm, p, start, f32, folder, tools, calib, tuple(args.comparators.split(",")),
                                    args.random)
    table = equal_bytes.measure(lm, rows, facts, text, window, int(p.tensors.n.sum()))
    chosen = [i for i, r in enumerate(rows) if r["row"] in args.diagnose.split(",")]
    if chosen:
        diag = diagnose(lm, facts, [rows[i]["width"] for i in chosen], calib[:4], causal=False,
                        max_prompts=args.max_prompts, progress=True)
        table.loc[chosen, "verdict"] = [c["verdict"] for c in diag.configurations]
    table.insert(0, "model", args.model)
    table["seconds"] = round(time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"prescription_{args.model}.csv", table)
    cols = ["group", "row", "bytes", "bytes_ratio", "bpw", "kl", "top1_agreement", "lost", "lost_lo", "lost_hi"]
    cols += ["verdict"] if "verdict" in table else []
    md = table[cols].round(4).to_markdown(index=False) + "\n\n" + equal_bytes.verdict_text(table) + "\n"
    atomic_write_bytes(args.out / f"prescription_{args.model}.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
