"""The loop every analysis shares: each configuration (a bit width, a quantizer, a group size; or
any other change to the model) applied in turn, one at a time, with the reference scored once.

    ref = Reference(model, facts)                 # the reference's answers, scored once
    for w in each_width(model, specs, calib):     # quantized one at a time, weights swapped in
        right = ref.reference_right(ref.score(model, w))  # its Robust / Failure prompts
        with w.applied(model):
            ...

A ``Width`` is a label and a way to apply it; a quantization spec becomes one through
``each_width``, anything else (a mixed plan, an existing checkpoint, a known perturbation) can be
built directly and passed in the same list.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import store
from ..core.data import Fact
from ..quant import checkpoint, gguf
from ..quant.checkpoint import Checkpoint
from ..quant.plan import Plan, avg_bits, check_specs, uniform_plan
from ..quant.quantize import FULL_PRECISION, QuantSpec
from ..quant.quantizer import quantize_model
from ..quant.swap import QuantizedWeights
from . import evaluate as ev


@dataclass
class Width:
    """One configuration of the model: how it is labelled in results, and how it is applied.

    ``apply(model)`` returns a context inside which the model runs this configuration (None: the
    reference itself). ``weights`` are the quantized weights when the configuration is a plan.
    ``key`` names the configuration's content for the run store (None: results are not stored)."""

    method: str
    bits: int
    group_size: int | None = None
    sym: bool | None = None
    avg_bits: float = float(FULL_PRECISION)
    seconds: float = 0.0
    apply: Callable[[nn.Module], AbstractContextManager] | None = field(default=None, repr=False)
    weights: QuantizedWeights | None = field(default=None, repr=False)
    plan: Plan | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    @property
    def is_reference(self) -> bool:
        return self.apply is None

    @property
    def label(self) -> dict:
        """The columns that identify this configuration in every result table."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "avg_bits": self.avg_bits}

    @property
    def spec(self) -> QuantSpec:
        """The uniform spec this configuration was made from; raises for anything else (an existing
        checkpoint, a mixed plan), which analyses that re-quantize parts of the model cannot take."""
        if self.checkpoint is not None or self.plan is None or self.is_reference:
            raise ValueError(f"{self.method} is not one of qdiag's uniform quantizations, and this analysis "
                             "re-quantizes parts of the model with qdiag's quantizers: run cliff, lens, causal, "
                             "components, representations, sensitivity or diagnose on it")
        if self.method in gguf.TYPES:
            return QuantSpec.gguf(self.method)
        return QuantSpec(self.bits, self.group_size, self.sym, self.method)

    def release(self) -> None:
        """Drop the quantized weights (the label stays; a checkpoint keeps what describes it, and
        ``each_width`` reads its weights again when the loop reaches it)."""
        if self.weights is not None:
            self.weights, self.plan, self.apply = None, None, _released
        if self.checkpoint is not None and self.checkpoint.weights is not None:
            self.checkpoint = dataclasses.replace(self.checkpoint, weights=None)

    def applied(self, model: nn.Module) -> AbstractContextManager:
        """Run ``model`` as this configuration inside the block; the reference again after it."""
        return nullcontext(model) if self.apply is None else self.apply(model)


def reference_width() -> Width:
    return Width("fp", FULL_PRECISION, key="reference")


def quantized_width(model: nn.Module, spec: QuantSpec, calib: torch.Tensor | None = None,
                    plan: Plan | None = None, progress: bool = True) -> Width:
    """``spec`` applied to every decoder matrix (or to ``plan``), quantized now."""
    if spec.is_full_precision and plan is None:
        return reference_width()
    plan = uniform_plan(model, spec) if plan is None else plan
    qw = quantize_model(model, plan, calib, progress=progress)
    return Width(spec.method, spec.bits, spec.group_size, spec.sym, avg_bits(model, plan), qw.seconds,
                 apply=qw.applied, weights=qw, plan=plan, key=qw.key)


def checkpoint_width(model: nn.Module, path: str, progress: bool = False, lazy: bool = False) -> Width:
    """An existing quantized checkpoint of ``model`` (a GGUF file, a GPTQ / AWQ / compressed-tensors
    folder, or a hub id) as a configuration: its matrices swapped in packed, labelled by its format
    (``gguf-Q4_K``, ``gptq-ckpt``) and its storage bits per weight. ``lazy``: read and checked now,
    its weights released at once and read again when ``each_width`` reaches it, so that a list of
    many checkpoints holds one checkpoint's weights at a time."""
    t0 = time.perf_counter()
    ckpt = checkpoint.read(model, path, progress=progress)
    w = Width(ckpt.method, ckpt.bits, ckpt.group_size, None, ckpt.avg_bits, time.perf_counter() - t0,
              apply=ckpt.weights.applied, weights=ckpt.weights, key=ckpt.weights.key, checkpoint=ckpt)
    if lazy:
        w.release()
    return w


def _reread(model: nn.Module, w: Width, progress: bool) -> Width:
    """A released checkpoint's configuration with its weights read again (its label kept)."""
    again = checkpoint_width(model, w.checkpoint.path, progress=progress)
    return dataclasses.replace(again, method=w.method)


def distinct_labels(configs: list[QuantSpec | Width]) -> list[QuantSpec | Width]:
    """Checkpoints that would share a label with another configuration (two ``Q4_0`` files, two
    GPTQ folders of the same bits) labelled by their file or folder name too: ``gguf-Q4_0[a.gguf]``."""
    def label(c: QuantSpec | Width) -> tuple:
        return c.method, c.bits, c.group_size

    counts: dict[tuple, int] = {}
    for c in configs:
        counts[label(c)] = counts.get(label(c), 0) + 1
    return [dataclasses.replace(c, method=f"{c.method}[{Path(str(c.checkpoint.path)).name}]")
            if isinstance(c, Width) and c.checkpoint is not None and counts[label(c)] > 1 else c for c in configs]


def each_width(model: nn.Module, configs: Iterable[QuantSpec | Width], calib: torch.Tensor | None = None,
               progress: bool = True, desc: str = "widths") -> Iterator[Width]:
    """Each configuration in turn: specs are checked against every matrix now, before any work,
    then quantized one at a time as the loop reaches them (only one configuration's weights are
    held); ``Width`` items pass through as they are."""
    configs = check_configs(model, configs)
    return _each(model, configs, calib, progress, desc)


def check_configs(model: nn.Module, configs: Iterable[QuantSpec | Width]) -> list[QuantSpec | Width]:
    """The configurations as a list, every spec checked against every decoder matrix; raises on
    bad input before any work."""
    configs = list(configs)
    if not configs:
        raise ValueError("no configurations given")
    bad = [c for c in configs if not isinstance(c, (QuantSpec, Width))]
    if bad:
        raise TypeError(f"configurations must be QuantSpec or Width, got {type(bad[0]).__name__}")
    specs = [c for c in configs if isinstance(c, QuantSpec)]
    if specs:
        check_specs(model, specs)
    return configs


def quantized_only(configs: Sequence[QuantSpec | Width]) -> list[QuantSpec | Width]:
    """The configurations that are not the reference; raises when none is left."""
    kept = [c for c in configs if not (c.is_full_precision if isinstance(c, QuantSpec) else c.is_reference)]
    if not kept:
        raise ValueError("no quantized configuration given: this analysis needs a quantized width (16 bits is the "
                         "reference itself), e.g. --bits 4,2")
    return kept


def _each(model: nn.Module, configs: list, calib: torch.Tensor | None, progress: bool, desc: str) -> Iterator[Width]:
    for c in tqdm(configs, desc=desc, disable=not progress):
        if isinstance(c, Width) and c.checkpoint is not None and c.weights is None:
            w = _reread(model, c, progress=False)  # a lazy checkpoint: held only while the loop is on it
            yield w
            w.release()
            continue
        if isinstance(c, Width):
            yield c
            continue
        w = quantized_width(model, c, calib, progress=progress)
        yield w
        w.release()  # before the next configuration is quantized


def output_fidelity(model: nn.Module, tokens: torch.Tensor, width: Width, window: int = 512,
                    seed: int = 0) -> dict:
    """``evaluate.output_fidelity`` of ``width`` against the reference (perplexity, KL, top-1
    agreement), kept in the run store when the width has a key. The reference's log-probabilities
    on the text are computed once for a loop over configurations (held in host memory while they fit
    in 2 GiB)."""
    reference = store.model_digest(model)
    code = store.code_digest(*ev.text_code())
    key = store.digest(reference, width.key, tokens, window, seed, code) if width.key else None

    def compute() -> dict:
        if width.is_reference:
            return ev.output_fidelity(model, tokens, None, window, seed=seed)
        text = store.digest(reference, tokens, window)
        if _REFERENCE_TEXT.get("key") != text:
            _REFERENCE_TEXT.clear()  # one text at a time: the previous one's memory goes first
            _REFERENCE_TEXT.update(key=text, logprobs=ev.reference_logprobs(model, tokens, window))
        return ev.output_fidelity(model, tokens, width.applied, window, seed=seed,
                                  reference=_REFERENCE_TEXT["logprobs"])

    return store.cached("fidelity", key, compute)


# The reference's log-probabilities on the last text compared (``output_fidelity``), keyed by the
# reference's weights, the tokens and the window.
_REFERENCE_TEXT: dict = {}


def _released(model: nn.Module) -> AbstractContextManager:
    raise RuntimeError("this configuration's quantized weights were released when the loop moved on; "
                       "apply it inside the loop over each_width")


class Reference:
    """The reference's scores on every prompt of ``facts``, computed once, and each configuration's
    Robust / Failure subsets against them. Scores are kept in the run store (``core.store``),
    keyed by the reference's weights and tokenizer, the prompts, the configuration and the code."""

    def __init__(self, model: nn.Module, facts: list[Fact], progress: bool = False) -> None:
        self.table = ev.prompt_table(facts, model.tokenizer)
        self.key = store.digest(store.model_digest(model), self.table, store.code_digest(*ev.scoring_code()))
        self.scored = store.cached("scores", self.key,
                                   lambda: ev.score_prompts(model, model.tokenizer, self.table, progress=progress))

    def score(self, model: nn.Module, width: Width, progress: bool = False) -> pd.DataFrame:
        """Every prompt scored with ``width`` applied (the reference's own scores for the reference)."""
        if width.is_reference:
            return self.scored

        def compute() -> pd.DataFrame:
            with width.applied(model):
                return ev.score_prompts(model, model.tokenizer, self.table, progress=progress)

        return store.cached("scores", store.digest(self.key, width.key) if width.key else None, compute)

    def subsets(self, scored: pd.DataFrame) -> pd.DataFrame:
        """``fact``, ``template``, ``subset`` per prompt: robust, failure or fp_wrong."""
        return ev.subsets(self.scored, scored).reset_index()

    def reference_right(self, scored: pd.DataFrame) -> pd.DataFrame:
        """The prompts the reference gets right, with their ``subset`` (robust / failure) against
        a configuration's ``scored`` prompts; raises when there are none."""
        return ev.reference_right(self.table, self.scored, scored)
