"""What every analysis starts from: a model, a sample of facts, perplexity text and calibration
text, loaded once with the same options for the CLI and the notebooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data
from .models import DEFAULT_MODEL, load_model


@dataclass
class Experiment:
    model: object  # the nnsight-wrapped model; ``model.tokenizer`` is its tokenizer
    facts: list[data.Fact]
    ppl_tokens: torch.Tensor  # (n,) WikiText-2 test tokens; empty when none were asked for
    calib: torch.Tensor | None  # (n_samples, seq_len) WikiText-2 valid tokens, for GPTQ


def prepare(model: str = DEFAULT_MODEL, *, n_facts: int | None = 200, ppl_tokens: int = 16384,
            calib_samples: int = 64, calib_len: int = 512, seed: int = 0, data_root: str | None = None,
            device: str = "cpu", dtype: str = "float32", calibrate: bool = True) -> Experiment:
    """Load the model and the data an analysis needs; all sampling is seeded. ``ppl_tokens=0``
    loads no perplexity text (analyses that do not measure perplexity)."""
    lm = load_model(model, device=device, dtype=dtype)
    tok = lm.tokenizer
    facts = data.sample_facts(data.load_pararel(data_root), n_facts, seed=seed)
    ppl = data.text_tokens(tok, data.load_text("test", data_root), ppl_tokens) if ppl_tokens else torch.empty(0)
    calib = data.calibration_tokens(tok, calib_samples, calib_len, seed, data_root) if calibrate else None
    return Experiment(lm, facts, ppl, calib)
