"""What every analysis starts from: a model, a sample of facts, the facts the model knows
(screened), perplexity text and calibration text, loaded once with the same options for the CLI
and the notebooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .core import data
from .core.models import DEFAULT_MODEL, load_model
from .measure import screen


@dataclass
class Experiment:
    model: object  # the nnsight-wrapped model; ``model.tokenizer`` is its tokenizer
    facts: list[data.Fact]  # a seeded random sample, spread over relations (what recall is measured on)
    ppl_tokens: torch.Tensor  # (n,) WikiText-2 test tokens; empty when none were asked for
    calib: torch.Tensor | None  # (n_samples, seq_len) WikiText-2 valid tokens, for GPTQ
    known: list[data.Fact] | None = None  # reference-right prompts only (screened); None when not asked for
    screening: dict = field(default_factory=dict)  # what the screening found and how long it took

    @property
    def analysed(self) -> list[data.Fact]:
        """The facts analyses of what quantization breaks work on: the known ones when screened."""
        return self.facts if self.known is None else self.known


def prepare(model: str = DEFAULT_MODEL, *, n_facts: int | None = 200, known: int | None = None,
            screen_facts: int | None = None, ppl_tokens: int = 16384, calib_samples: int = 64,
            calib_len: int = 512, seed: int = 0, data_root: str | None = None, device: str = "cpu",
            dtype: str = "float32", calibrate: bool = True, progress: bool = False,
            device_map: str | dict | None = None, max_memory: str | dict | None = None) -> Experiment:
    """Load the model and the data an analysis needs; all sampling is seeded. ``n_facts``: the
    random sample (None: every fact; 0: none, for analyses that only use known facts).

    ``known``: also screen ``screen_facts`` facts (a seeded sample spread over relations; None: all
    of ParaRel) with the reference and draw that many reference-right prompts, stratified by
    relation (``measure.screen``; 0 or None: no screening). ``ppl_tokens=0`` loads no perplexity
    text (analyses that do not measure perplexity). ``device_map`` / ``max_memory``: spread the
    model over several GPUs (``core.models.load_model``); ``device`` is then unused."""
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                    progress=progress)
    tok = lm.tokenizer
    pool = data.load_pararel(data_root)
    facts = data.sample_facts(pool, n_facts, seed=seed) if n_facts != 0 else []
    ppl = data.text_tokens(tok, data.load_text("test", data_root), ppl_tokens) if ppl_tokens else torch.empty(0)
    calib = data.calibration_tokens(tok, calib_samples, calib_len, seed, data_root) if calibrate else None
    exp = Experiment(lm, facts, ppl, calib)
    if known:
        screened_facts = data.sample_facts(pool, screen_facts, seed=seed)
        screened = screen.screen(lm, screened_facts, progress=progress)
        exp.known = screen.known_facts(screened, screened_facts, known, seed)
        exp.screening = screen.summary(screened, exp.known)
    return exp
