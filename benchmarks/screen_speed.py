"""How long the known-fact screening takes: prompts scored per second, and the time to screen all
of ParaRel (136,040 prompts of 25,131 usable facts) extrapolated from a sample.

    python benchmarks/screen_speed.py                        # the default model on this CPU, ParaRel
    python benchmarks/screen_speed.py --random llama-8b      # a random model of Llama-3.1-8B's shapes, GPU

With ``--random`` the prompts are synthetic: ten words each from the tiny test tokenizer (about
the length of a ParaRel prompt in a BPE tokenizer), since no data or real tokenizer travels to the
GPU machines. The store is off: every prompt is scored.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from qdiag.core.data import Fact
from qdiag.measure.screen import screen

PARAREL_PROMPTS = 136_040


def synthetic(n: int, seed: int = 0) -> list[Fact]:
    """``n`` one-template facts whose prompts are ten words of the tiny tokenizer's vocabulary."""
    from qdiag.testing import WORDS

    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [Fact(f"P{i % 39}", " ".join(rng.choices(words, k=4)) + f" {i}",
                 rng.choice(words), (" ".join(rng.choices(words, k=5)) + " [X] is [Y]",)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", default=None, help="a shape of qdiag.testing.REAL_SHAPES, on the GPU")
    ap.add_argument("--prompts", type=int, default=2000, help="how many prompts to time")
    ap.add_argument("--batch-sizes", default="64", help="comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    os.environ["QDIAG_STORE"] = "off"
    if args.random:
        from transformers import AutoConfig, AutoModelForCausalLM

        from qdiag.core.models import wrap
        from qdiag.testing import REAL_SHAPES, tiny_tokenizer

        cfg = dict(REAL_SHAPES[args.random])
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                                  dtype=getattr(torch, args.dtype)).eval()
        model, facts = wrap(hf, tiny_tokenizer()), synthetic(args.prompts)
    else:
        from qdiag.core import data
        from qdiag.core.models import load_model

        model = load_model()
        facts, n = [], 0
        for f in data.sample_facts(data.load_pararel(), None, seed=1):
            facts.append(f)
            n += len(f.templates)
            if n >= args.prompts:
                break
    for bs in map(int, args.batch_sizes.split(",")):
        screen(model, facts[: max(1, len(facts) // 20)], batch_size=bs)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scored = screen(model, facts, batch_size=bs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rate = len(scored) / seconds
        print(f"batch {bs}: {len(scored)} prompts in {seconds:.1f} s, {rate:.0f} prompts/s; all of ParaRel "
              f"({PARAREL_PROMPTS:,} prompts): {PARAREL_PROMPTS / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
