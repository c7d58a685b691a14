"""Evaluation: perplexity, factual recall per template (Acc@any / majority / all), the rank of
the answer, the Robust and Failure subsets, and bootstrap intervals.

Recall scores the first token of the answer (``" " + object``): a prompt is right when that
token is the model's greedy next token. ParaRel objects can span several tokens of a modern
tokenizer, so this is first-token accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import unwrap
from ..core.data import Fact, bos_id
from .readout import last_logits, prob_and_rank


def text_windows(model: nn.Module, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping ``window``-token windows from the start of ``tokens`` (1-D; a shorter tail
    is dropped), each led by the BOS token where the model's tokenizer adds one to every text
    (``data.bos_id``): ``(windows, window)`` or ``(windows, 1 + window)``. Scoring ``ids[:, 1:]``
    from ``logits[:, :-1]`` then scores every token of a window after a BOS, and all but the first
    (context only) without one; the BOS itself is never scored."""
    n_windows = tokens.numel() // window
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {window}")
    windows = tokens[: n_windows * window].reshape(n_windows, window)
    bos = bos_id(getattr(model, "tokenizer", None))
    return windows if bos is None else torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], 1)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 512, batch_size: int = 4,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) over the windows of ``text_windows`` (non-overlapping, from the
    start, led by BOS where the tokenizer adds one)."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    windows = text_windows(model, tokens, window)
    n_windows = windows.shape[0]
    nll, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = hf(input_ids=ids, use_cache=False).logits
        for row in range(ids.shape[0]):  # in float32 one window at a time: a large vocabulary's logits are big
            nll += nn.functional.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def reference_logprobs(model: nn.Module, tokens: torch.Tensor | None, window: int = 512, batch_size: int = 4,
                       budget: int = 2**31, windows: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """The reference's next-token log-probabilities on the windows of ``text_windows``, one tensor
    per batch of ``output_fidelity`` in host memory, to compare every configuration with one reference pass; None
    when they would take more than ``budget`` bytes (vocabulary x tokens x 4)."""
    hf = unwrap(model)
    windows = text_windows(model, tokens, window) if windows is None else windows
    vocab = hf.get_output_embeddings().weight.shape[0]
    if windows.shape[0] * (windows.shape[1] - 1) * vocab * 4 > budget:
        return None
    device = next(hf.parameters()).device
    return [_logprobs(hf(input_ids=windows[s : s + batch_size].to(device), use_cache=False).logits, "cpu")
            for s in range(0, windows.shape[0], batch_size)]


def _logprobs(logits: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 log-probabilities of every position but the last, one window at a time (the float32
    copy of a large vocabulary's logits is the largest tensor here), on ``device`` (default: theirs)."""
    return torch.stack([torch.log_softmax(row[:-1].float(), -1).to(device or row.device) for row in logits])


@torch.no_grad()
def output_fidelity(model: nn.Module, tokens: torch.Tensor | None, applied, window: int = 512, batch_size: int = 4,
                    seed: int = 0, reference: list[torch.Tensor] | None = None, windows: torch.Tensor | None = None,
                    first: int = 0) -> dict:
    """How close a configuration's next-token distributions are to the reference's on text: the
    mean KL divergence ``KL(reference || configuration)`` per token and the share of tokens whose
    top prediction agrees, with 95% bootstrap intervals over tokens; ``kl_null``: the KL of a
    uniform distribution from the reference (what an output that says nothing scores); and the
    configuration's ``ppl`` on the same windows (as ``perplexity`` computes it, from the same
    forward). ``applied(model)`` is the context that runs the configuration (``Width.applied``;
    None: the reference itself, run once); windows as in ``text_windows``. ``reference``: the
    reference's log-probabilities from ``reference_logprobs`` (same windows and batch size), to
    skip its forward passes. ``windows (n, T)`` instead of ``tokens`` scores windows given as they
    are, and ``first`` scores only the predictions from position ``first`` on (llama-perplexity's
    protocol: chunks of ``n_ctx`` tokens, the second half of each scored)."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    windows = text_windows(model, tokens, window) if windows is None else windows
    n_windows = windows.shape[0]
    kl, agree, kl_null = [], [], []
    nll, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        ids = windows[start : start + batch_size].to(device)
        # the positions that predict a scored token (see text_windows); vocabulary-sized work one window at a time
        if reference is not None:
            refs = reference[start // batch_size]
        else:
            refs = hf(input_ids=ids, use_cache=False).logits
        if applied is None:  # the reference itself: one forward
            qs = refs
        else:
            with applied(model):
                qs = hf(input_ids=ids, use_cache=False).logits
        for row in range(ids.shape[0]):
            ref = refs[row].to(device) if reference is not None else _logprobs(refs[row : row + 1])[0]
            q = ref if applied is None else _logprobs(qs[row : row + 1])[0]
            ref, q, target = ref[first:], q[first:], ids[row, 1 + first:]
            nll -= float(q.gather(-1, target[:, None]).sum())
            count += target.numel()
            p = ref.exp()
            kl.append((p * (ref - q)).sum(-1).cpu())
            kl_null.append((p * (ref + math.log(ref.shape[-1]))).sum(-1).cpu())
            agree.append((ref.argmax(-1) == q.argmax(-1)).float().cpu())
    kl, agree, kl_null = torch.cat(kl).numpy(), torch.cat(agree).numpy(), torch.cat(kl_null).numpy()
    kl_lo, kl_hi = bootstrap_ci(kl, seed=seed)
    a_lo, a_hi = bootstrap_ci(agree, seed=seed)
    return {"kl": float(kl.mean()), "kl_lo": kl_lo, "kl_hi": kl_hi, "top1_agreement": float(agree.mean()),
            "top1_agreement_lo": a_lo, "top1_agreement_hi": a_hi, "kl_null": float(kl_null.mean()),
            "n_tokens": int(kl.size), "ppl": math.exp(nll / count)}


def scoring_code() -> tuple:
    """The functions prompt scores depend on, for the run store's keys."""
    return (prompt_table, answer_token, encode_prompts, score_prompts, last_logits, prob_and_rank, unwrap)


def text_code() -> tuple:
    """The functions text scores (perplexity, output fidelity) depend on, for the store's keys."""
    return (text_windows, bos_id, reference_logprobs, _logprobs, output_fidelity, bootstrap_ci)


def answer_token(tokenizer, obj: str) -> int:
    """The first token of ``" " + obj``: the token the model must predict after the prompt."""
    ids = tokenizer(" " + obj, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"object {obj!r} tokenizes to nothing")
    return ids[0]


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> dict:
    """Left-padded batch with position ids that start at 0 on each prompt's first real token."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device),
            "position_ids": position_ids.to(device)}


def prompt_table(facts: list[Fact], tokenizer) -> pd.DataFrame:
    """One row per (fact, template): ``fact``, ``relation``, ``template``, ``prompt``, ``answer_id``."""
    if not facts:
        raise ValueError("no facts to evaluate")
    rows = []
    for f in facts:
        tok = answer_token(tokenizer, f.obj)
        for t, prompt in enumerate(f.prompts()):
            rows.append({"fact": f.id, "relation": f.relation, "template": t, "prompt": prompt, "answer": f.obj,
                         "answer_id": tok})
    return pd.DataFrame(rows)


@torch.no_grad()
def score_prompts(model: nn.Module, tokenizer, table: pd.DataFrame, batch_size: int = 32,
                  progress: bool = False) -> pd.DataFrame:
    """Add ``prob``, ``rank`` (1 = top) of the answer token and ``correct`` (greedy hit) per prompt."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    probs, ranks, preds = [], [], []
    order = np.argsort(table.prompt.str.len().to_numpy(), kind="stable")  # similar lengths pad less
    for start in tqdm(range(0, len(order), batch_size), desc="recall", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = encode_prompts(tokenizer, table.prompt.iloc[idx].tolist(), device)
        logits = last_logits(hf, batch)
        prob, rank = prob_and_rank(logits, torch.tensor(table.answer_id.iloc[idx].to_numpy()))
        ranks.append(rank.cpu())
        probs.append(prob.cpu())
        preds.append(logits.argmax(-1).cpu())
    inv = np.argsort(order)
    out = table.copy()
    out["prob"] = torch.cat(probs).numpy()[inv]
    out["rank"] = torch.cat(ranks).numpy()[inv]
    out["pred_id"] = torch.cat(preds).numpy()[inv]
    out["correct"] = out["rank"] == 1
    return out


def fact_accuracy(scored: pd.DataFrame) -> pd.DataFrame:
    """Per fact: ``any`` (right for at least one template), ``majority`` (more than half), ``all``."""
    g = scored.groupby("fact", sort=False)["correct"]
    return pd.DataFrame({"any": g.any(), "majority": g.mean() > 0.5, "all": g.all()})


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 stat: str = "mean") -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or ``stat="median"``) of ``values``, resampling
    items with replacement."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, values.size, (n_boot, values.size))]
    stats = np.median(resampled, 1) if stat == "median" else resampled.mean(1)
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def bootstrap_ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(num) / mean(den)``, resampling items (pairs)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, (n_boot, num.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num[idx].mean(1) / den[idx].mean(1)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return float(np.quantile(ratios, a)), float(np.quantile(ratios, 1 - a))


def accuracy_summary(scored: pd.DataFrame, seed: int = 0) -> dict:
    """Acc@any / majority / all with 95% bootstrap intervals over facts, and the median rank."""
    acc = fact_accuracy(scored)
    out: dict = {}
    for kind in ("any", "majority", "all"):
        v = acc[kind].to_numpy()
        lo, hi = bootstrap_ci(v, seed=seed)
        out[f"acc_{kind}"], out[f"acc_{kind}_lo"], out[f"acc_{kind}_hi"] = float(v.mean()), lo, hi
    out["median_rank"] = float(scored["rank"].median())
    out["n_facts"] = int(len(acc))
    out["n_prompts"] = int(len(scored))
    return out


def subsets(fp: pd.DataFrame, quant: pd.DataFrame) -> pd.Series:
    """Per prompt: "robust" (FP and quantized right), "failure" (FP right, quantized wrong), or
    "fp_wrong"; rows are matched on (fact, template)."""
    key = ["fact", "template"]
    m = fp[key + ["correct"]].merge(quant[key + ["correct"]], on=key, suffixes=("_fp", "_q"), validate="1:1")
    label = np.where(~m.correct_fp, "fp_wrong", np.where(m.correct_q, "robust", "failure"))
    return pd.Series(label, index=pd.MultiIndex.from_frame(m[key]), name="subset")


def reference_right(table: pd.DataFrame, fp: pd.DataFrame, quant: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` whose prompt the reference (scored ``fp``) gets right, with their
    ``subset`` against the quantized model's scores ``quant``: "robust" or "failure". Raises when
    there are none (nothing to recover or to lose)."""
    subset = subsets(fp, quant).reset_index()
    right = table.merge(subset[subset.subset != "fp_wrong"], on=["fact", "template"])
    if right.empty:
        raise ValueError(f"the reference answers none of the {len(table)} prompts correctly, so there is nothing "
                         "to recover or to lose; use more facts (--facts) or a larger model")
    return right


def subset_accuracy(scored: pd.DataFrame, subset: pd.DataFrame, seed: int = 0) -> dict:
    """Share right on the Robust and on the Failure prompts, with 95% bootstrap intervals."""
    d = scored.merge(subset, on=["fact", "template"])
    out = {}
    for name in ("robust", "failure"):
        v = d[d.subset == name].correct.to_numpy(dtype=float)
        lo, hi = bootstrap_ci(v, seed=seed)
        out.update({f"{name}_acc": float(v.mean()) if v.size else float("nan"), f"{name}_acc_lo": lo,
                    f"{name}_acc_hi": hi, f"n_{name}": int(v.size)})
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations of each prompt (for showing what a quantized model says)."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    batch = encode_prompts(tokenizer, prompts, device)
    batch.pop("position_ids")
    out = hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
