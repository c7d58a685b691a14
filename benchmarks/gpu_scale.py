"""Every analysis on a random-weight model of a real size (default: Llama-3.1-8B's shapes, bfloat16)
on one GPU, or sharded over several (``--device-map auto``): seconds and peak GPU memory of each, the
peak as a ratio to the model's weight bytes (on one card), or each card's peak against the weight
bytes placed on it (sharded).

The default model cannot travel to the GPU machines here, and no hub is reachable; a random model
with the same shapes costs the same. Its facts are prompts it answers itself (as in the tests), so
the numbers are about cost, not about quantization. Run from the repository root:

    python benchmarks/gpu_scale.py --random llama-8b [--out results.json]
    python benchmarks/gpu_scale.py --random llama-70b-48l --device-map auto --only "logit lens"

``--sites N`` records PyTorch's allocation history during each analysis (its seconds then include the
recording) and, for each whose peak is above ``--sites-above`` times the weight bytes, prints the N
places that allocated the most of what was live at that peak (the innermost qdiag line of each
allocation's Python stack): what to cut next.
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
    ap.add_argument("--device-map", default=None, help="'auto', 'balanced' or 'sequential': shard over the GPUs")
    ap.add_argument("--max-memory", default=None, help="with --device-map: per card, e.g. '0=60GiB,1=60GiB'")
    ap.add_argument("--sites", type=int, default=0, help="print this many allocation sites live at the peak")
    ap.add_argument("--sites-above", type=float, default=1.5, help="for analyses whose peak / weights is above this")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from qdiag.analyses.causal import run_causal
    from qdiag.analyses.cliff import run_cliff
    from qdiag.analyses.components import run_components
    from qdiag.analyses.lens import run_lens
    from qdiag.analyses.repair import run_repair
    from qdiag.analyses.representations import run_representations
    from qdiag.analyses.sensitivity import run_sensitivity
    from qdiag.core import store
    from qdiag.core.models import check_placement, parse_max_memory, wrap
    from qdiag.diagnosis import diagnose
    from qdiag.diagnosis.prescribe import prescribe
    from qdiag.measure.widths import quantized_width
    from qdiag.quant.plan import uniform_plan
    from qdiag.quant.quantize import QuantSpec
    from qdiag.quant.quantizer import quantize_model
    from qdiag.testing import known_facts, tiny_tokenizer

    cfg = dict(RANDOM[args.random])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.device_map is None:
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    else:
        hf = sharded(AutoModelForCausalLM, config, dtype, args.device_map, parse_max_memory(args.max_memory))
    tok = tiny_tokenizer()
    hf.lm_head.weight[len(tok):] = 0  # ids the tokenizer does not have are never the top prediction
    model = wrap(hf, tok)
    facts = known_facts(hf, tok)
    check_placement(hf)
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    cards = list(range(torch.cuda.device_count()))
    on_card = {i: sum(p.numel() * p.element_size() for p in hf.parameters() if p.device == torch.device("cuda", i))
               for i in cards}
    vocab = len(tok)
    ppl = torch.randint(4, vocab, (args.ppl_tokens,))
    calib = torch.randint(4, vocab, (args.calib_samples, args.calib_len))
    specs = [QuantSpec(16), QuantSpec(4, 128, method="rtn"), QuantSpec(2, 128, method="rtn")]
    q2 = specs[2]
    print(f"{args.random} ({args.dtype}): {weights / 2**30:.1f} GiB of weights, {len(facts)} facts it answers, "
          f"{torch.cuda.get_device_name()}; GiB of weights per card: "
          f"{[round(on_card[i] / 2**30, 1) for i in cards]}", flush=True)

    def digest() -> str:
        store._DIGESTS.clear()  # remembered per model: measure computing it
        return store.weights_digest(model)

    def prescription():
        w = quantized_width(model, QuantSpec(3, 128, method="rtn"), calib, progress=False)
        return prescribe(model, w, calib, "+0.25bpw", "gptqmodel", kl_windows=2, fisher_windows=8, progress=False)

    runs = {
        "weights digest (run-store key)": digest,
        "prescribe (rtn 3-bit, gptqmodel, +0.25bpw)": prescription,
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
    used = [i for i in cards if on_card[i]]
    print(f"{'analysis':<40} {'seconds':>8} {'peak / weights':>15}  peak GiB per card  (GiB held before it)")
    for name, fn in runs.items():
        if args.only and not any(name.startswith(w) for w in args.only):
            continue
        for i in cards:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        held = [round(torch.cuda.memory_allocated(i) / 2**30, 1) for i in used]
        t0 = time.perf_counter()
        sites = peak_sites(fn, args.sites) if args.sites else None
        if sites is None:
            fn()
        for i in cards:
            torch.cuda.synchronize(i)
        seconds = time.perf_counter() - t0
        peaks = {i: torch.cuda.max_memory_allocated(i) for i in used}
        ratio = max(peaks[i] / on_card[i] for i in used)  # the worst card, against the weights it holds
        table.append({"analysis": name, "seconds": round(seconds, 1), "peak_over_weights": round(ratio, 3),
                      "peak_gib_per_card": [round(peaks[i] / 2**30, 1) for i in used], "held_gib_before": held,
                      "sites": sites})
        print(f"{name:<40} {seconds:>8.1f} {ratio:>15.3f}  {table[-1]['peak_gib_per_card']}  ({held})", flush=True)
    for row in table:
        if row["sites"] and row["peak_over_weights"] > args.sites_above:
            print(f"\n{row['analysis']}: memory allocated during it and live at its peak, by site", flush=True)
            for site, size in row["sites"]:
                print(f"  {size / 2**30:8.2f} GiB  {site}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.random, "dtype": args.dtype, "facts": len(facts),
                                        "device_map": args.device_map, "weight_bytes": weights,
                                        "weight_bytes_per_card": list(on_card.values()), "rows": table}, indent=2))


def peak_sites(fn, n: int) -> list[tuple[str, int]]:
    """Run ``fn`` with the allocation history recorded on the current card; the ``n`` sites that
    allocated the most of what was live at the peak (of the memory allocated during ``fn``)."""
    torch.cuda.memory._record_memory_history(max_entries=20_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]

    def replay(stop: int | None = None):
        live, total, peak, at = {}, 0, 0, 0
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = e
                total += e["size"]
            elif e["action"] == "free_completed" and e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
            if total > peak:
                peak, at = total, i + 1
        return live, at

    live, _ = replay(replay()[1])
    sites: dict[str, int] = {}
    for e in live.values():
        frames = e.get("frames") or []
        ours = next((f for f in frames if "/qdiag/" in f["filename"]), None)
        inner = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
        where = f"{ours['filename'].split('/qdiag/')[-1]}:{ours['line']} {ours['name']}" if ours else "outside qdiag"
        site = f"{where}  <- {Path(inner['filename']).name}:{inner['line']} {inner['name']}"
        sites[site] = sites.get(site, 0) + e["size"]
    return sorted(sites.items(), key=lambda kv: -kv[1])[:n]


def sharded(auto_model, config, dtype: torch.dtype, device_map: str, max_memory: dict | None):
    """A random model placed over the GPUs as ``from_pretrained(device_map=...)`` places a real one:
    accelerate's map computed on the meta device, each module's weights drawn on its card, and the
    hooks that move activations between cards."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    with torch.device("meta"):
        hf = auto_model.from_config(config, dtype=dtype)
    no_split = hf._no_split_modules
    if device_map != "sequential":
        max_memory = get_balanced_memory(hf, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
    placement = infer_auto_device_map(hf, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    for name, device in placement.items():
        module = hf.get_submodule(name) if name else hf
        module.to_empty(device=torch.device("cuda", device) if isinstance(device, int) else device)
    for name, p in hf.named_parameters():
        with torch.no_grad():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, config.initializer_range)
    rotary = hf.model.rotary_emb  # its frequencies are buffers to_empty left unset: computed afresh on its card
    hf.model.rotary_emb = type(rotary)(config).to(next(rotary.buffers()).device)
    return dispatch_model(hf, placement).eval().requires_grad_(False)


if __name__ == "__main__":
    main()
