"""Speed of a patching sweep against the naive loop, as a ratio (lower is better; target < 0.6).

The sweep patches the reference's activation into the quantized model at every (layer, site,
position) cell for a batch of ParaRel prompts. Three ways, all on the same quantized model:

- ``sweep``: ``qdiag.patch.Rerun``, as ``qdiag patch`` runs it: one recorded forward, then each
  layer's cells rerun only layers l and above, side by side in one batch;
- ``naive_nnsight``: one full nnsight-traced forward per cell (``qdiag.patch.patch_nnsight``);
- ``naive_plain``: one full forward per cell without nnsight (plain hooks), so the ratio is not
  flattered by nnsight's overhead.

The three must give the same probabilities (checked, to 1e-4). Prints the times and the ratios.

    python benchmarks/patching_speed.py                 # the default model, 8 prompts
    python benchmarks/patching_speed.py --prompts 16 --sites resid
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sites", default="resid,attn,mlp")
    ap.add_argument("--positions", default="last_subject,last")
    ap.add_argument("--data", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    args = ap.parse_args()

    from qdiag.analyses.causal import KIND, _answer_prob
    from qdiag.core import data
    from qdiag.core import positions as P
    from qdiag.core.arch import resolve
    from qdiag.core.models import load_model
    from qdiag.measure.evaluate import prompt_table
    from qdiag.measure.patch import Edit, Rerun, patch_nnsight
    from qdiag.measure.trace import collect
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model

    torch.manual_seed(0)
    lm = load_model(args.model)
    arch = resolve(lm)
    facts = data.sample_facts(data.load_pararel(args.data), args.prompts, seed=0)
    table = prompt_table(facts, lm.tokenizer).groupby("fact").head(1).head(args.prompts)
    chunk = P.batches(table, facts, len(table))[0]
    batch = P.encode(lm.tokenizer, chunk.prompt.tolist(), chunk.subject_end.tolist())
    answer = torch.tensor(chunk.answer_id.to_numpy())
    sites, positions = args.sites.split(","), args.positions.split(",")
    idx = {p: P.token_index(batch, p) for p in positions}
    rows = torch.arange(len(chunk))
    fp = collect(lm, batch, ("attn_out", "mlp_out", "resid"))
    cells = [(layer, s, p) for layer in range(arch.n_layers) for s in sites for p in positions]

    def edits(layer, site, pos):
        return [Edit(layer, site, idx[pos], fp[KIND[site]][layer][rows, idx[pos]])]

    qw = quantize_model(lm, uniform_plan(lm, QuantSpec(args.bits, 128)), progress=False)

    def sweep():
        run = Rerun(lm, batch)
        out = {}
        for layer in range(arch.n_layers):
            group = [c for c in cells if c[0] == layer]
            logits, _ = run.run([edits(*c) for c in group])
            out.update(zip(group, _answer_prob(logits, answer)))
        return out

    def naive_nnsight():
        return {c: _answer_prob(patch_nnsight(lm, batch, edits(*c)), answer) for c in cells}

    def naive_plain():
        run = Rerun(lm, batch)
        out = {}
        for c in cells:
            logits, _ = run.run([edits(*c)], start=0)
            out[c] = _answer_prob(logits, answer)[0]
        return out

    times, results = {}, {}
    with qw.applied(lm):
        for name, fn in (("sweep", sweep), ("naive_nnsight", naive_nnsight), ("naive_plain", naive_plain)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                results[name] = fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    for name in ("naive_nnsight", "naive_plain"):
        worst = max(float((results[name][c] - results["sweep"][c]).abs().max()) for c in cells)
        assert worst < 1e-4, f"{name} disagrees with the sweep by {worst}"
    print(f"{args.model}: {arch.n_layers} layers, {len(chunk)} prompts, {len(cells)} cells "
          f"({', '.join(sites)} x {', '.join(positions)}), {args.bits}-bit RTN; best of {args.repeats}")
    for name, t in times.items():
        print(f"  {name:14s} {t:8.2f} s")
    print(f"ratio sweep / naive_nnsight: {times['sweep'] / times['naive_nnsight']:.3f}")
    print(f"ratio sweep / naive_plain:   {times['sweep'] / times['naive_plain']:.3f}")


if __name__ == "__main__":
    main()
