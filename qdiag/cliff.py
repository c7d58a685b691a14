"""The performance cliff: perplexity and factual recall of one model across bit widths and
quantizers (analysis 1 of the paper), as one tidy table."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import evaluate as ev
from .arch import resolve
from .data import Fact
from .plan import avg_bits, uniform_plan
from .quantize import FULL_PRECISION, QuantSpec, parse_bits
from .swap import quantize_model


@dataclass
class CliffResult:
    """``rows``: one per (method, bits); ``prompts``: one per (method, bits, fact, template);
    ``generations``: greedy continuations of a few prompts per (method, bits)."""

    rows: pd.DataFrame
    prompts: pd.DataFrame
    generations: pd.DataFrame


def cliff_specs(bits: Sequence[int | str], methods: Sequence[str], group_size: int | None,
                sym: bool) -> list[QuantSpec]:
    """The configurations of a cliff sweep; full precision once, first. Raises on bad input."""
    if not bits:
        raise ValueError("no bit widths given")
    if not methods:
        raise ValueError("no quantization methods given")
    widths = sorted({parse_bits(b) for b in bits}, reverse=True)
    specs = [QuantSpec(bits=FULL_PRECISION)] if FULL_PRECISION in widths else []
    specs += [QuantSpec(bits=b, group_size=group_size, sym=sym, method=m)
              for m in methods for b in widths if b != FULL_PRECISION]
    return specs


def run_cliff(model: nn.Module, facts: list[Fact], specs: list[QuantSpec], ppl_tokens: torch.Tensor,
              ppl_window: int = 512, calib: torch.Tensor | None = None, n_generations: int = 4,
              seed: int = 0, progress: bool = True) -> CliffResult:
    """Quantize the model with each spec in turn (one at a time, weights swapped), and measure."""
    tok = model.tokenizer
    arch = resolve(model)
    for s in specs:  # every plan is checked before any work starts
        if not s.is_full_precision:
            uniform_plan(model, s, arch=arch)
    table = ev.prompt_table(facts, tok)
    sample_prompts = [f.prompts()[0] for f in facts[:n_generations]]
    rows, prompts, gens = [], [], []
    fp_scored = None
    for spec in tqdm(specs, desc="cliff", disable=not progress):
        method = "fp" if spec.is_full_precision else spec.method
        if spec.is_full_precision:
            qw, bits_avg, seconds = None, float(FULL_PRECISION), 0.0
        else:
            plan = uniform_plan(model, spec, arch=arch)
            qw = quantize_model(model, plan, calib, progress=progress)
            bits_avg, seconds = avg_bits(model, plan, arch), qw.seconds
        with (qw.applied(model) if qw else nullcontext()):
            ppl = ev.perplexity(model, ppl_tokens, ppl_window, progress=progress)
            scored = ev.score_prompts(model, tok, table, progress=progress)
            texts = ev.generate(model, tok, sample_prompts) if sample_prompts else []
        if fp_scored is None and spec.is_full_precision:
            fp_scored = scored
        row = {"method": method, "bits": spec.bits,
               "group_size": None if spec.is_full_precision else spec.group_size,
               "sym": None if spec.is_full_precision else spec.sym,
               "avg_bits": bits_avg, "ppl": ppl, **ev.accuracy_summary(scored, seed=seed),
               "quant_seconds": seconds}
        if fp_scored is not None:
            counts = ev.subsets(fp_scored, scored).value_counts()
            row["n_robust"], row["n_failure"] = int(counts.get("robust", 0)), int(counts.get("failure", 0))
        rows.append(row)
        prompts.append(scored.assign(method=method, bits=spec.bits))
        gens += [{"method": method, "bits": spec.bits, "prompt": p, "generation": g}
                 for p, g in zip(sample_prompts, texts)]
        del qw
    return CliffResult(pd.DataFrame(rows), pd.concat(prompts, ignore_index=True), pd.DataFrame(gens))
