"""Data: ParaRel facts with their paraphrase templates, and WikiText-2 text for perplexity and
calibration.

Where the files come from, in order: the ``root`` argument, the ``QDIAG_DATA`` environment
variable (a folder laid out like ``shared/datasets``: ``pararel/patterns``, ``pararel/facts``,
``wikitext-2``), the user cache (``~/.cache/qdiag``, filled by a one-time download), and, when
all of those fail, qdiag's own probe set (with a warning).
"""

from __future__ import annotations

import json
import os
import random
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import probe
from .io import atomic_write_bytes

PARAREL_URL = "https://raw.githubusercontent.com/yanaiela/pararel/main/data"
WIKITEXT_URL = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"


@dataclass(frozen=True)
class Fact:
    """One subject-relation-object triple with the prompts that ask for its object."""

    relation: str
    subject: str
    obj: str
    templates: tuple[str, ...]  # each ends with "[Y]" (after stripping " ." and ".")

    @property
    def id(self) -> str:
        return f"{self.relation}:{self.subject}"

    def prompts(self) -> list[str]:
        """The text before the object, one per template (no trailing space)."""
        return [prompt_of(t, self.subject) for t in self.templates]


def prompt_of(template: str, subject: str) -> str:
    return template.replace("[X]", subject).rstrip(" .")[: -len("[Y]")].rstrip()


def usable(template: str) -> bool:
    """A template whose object ends the sentence and whose subject comes before it."""
    t = template.rstrip(" .")
    return t.endswith("[Y]") and "[X]" in t[: -len("[Y]")] and t.count("[Y]") == 1


def data_root(root: str | os.PathLike | None = None) -> Path | None:
    """The data folder from the argument or ``QDIAG_DATA``; None when neither is set."""
    root = root or os.environ.get("QDIAG_DATA")
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} (from the argument or QDIAG_DATA) does not exist")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("QDIAG_CACHE", Path.home() / ".cache" / "qdiag"))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=30) as r:
        atomic_write_bytes(dest, r.read())


PARAREL_RELATIONS = (
    "P1001 P101 P103 P106 P108 P127 P1303 P131 P136 P1376 P138 P140 P1412 P159 P17 P176 P178 P19 P190 P20 "
    "P264 P27 P276 P279 P30 P36 P361 P364 P37 P39 P407 P413 P449 P463 P47 P495 P530 P740 P937"
).split()


def _download_pararel(dest: Path, base_url: str) -> None:
    for rel in PARAREL_RELATIONS:
        for sub, remote in (("patterns", "pattern_data/graphs_json"), ("facts", "trex_lms_vocab")):
            target = dest / sub / f"{rel}.jsonl"
            if not target.exists():
                _fetch(f"{base_url}/{remote}/{rel}.jsonl", target)


def _pararel_dir(root: str | os.PathLike | None, download: bool, base_url: str) -> Path | None:
    given = data_root(root)
    if given is not None:
        folder = given / "pararel"
        if not (folder / "patterns").is_dir():
            raise FileNotFoundError(f"{given} has no pararel/patterns folder (expected the shared/datasets layout)")
        return folder
    cached = cache_dir() / "pararel"
    if not (cached / "patterns" / f"{PARAREL_RELATIONS[-1]}.jsonl").exists() and download:
        try:
            _download_pararel(cached, base_url)
        except OSError as err:
            warnings.warn(f"could not download ParaRel ({err}); using qdiag's small probe set instead", stacklevel=3)
            return None
    return cached if (cached / "patterns").is_dir() else None


def load_pararel(root: str | os.PathLike | None = None, relations: list[str] | None = None,
                 download: bool = True, base_url: str = PARAREL_URL) -> list[Fact]:
    """All ParaRel facts of relations that have at least one usable template (object last)."""
    folder = _pararel_dir(root, download, base_url)
    facts: list[Fact] = []
    if folder is None:
        if not download:  # a failed download has warned already
            warnings.warn("no ParaRel copy found (set QDIAG_DATA); using qdiag's small probe set", stacklevel=2)
        for rel, pairs in probe.probe_facts().items():
            if relations is None or rel in relations:
                tpl = tuple(probe.TEMPLATES[rel])
                facts += [Fact(rel, s, o, tpl) for s, o in pairs]
        return facts
    for pattern_file in sorted((folder / "patterns").glob("P*.jsonl")):
        rel = pattern_file.stem
        if relations is not None and rel not in relations:
            continue
        templates = tuple(dict.fromkeys(p["pattern"] for p in _read_jsonl(pattern_file) if usable(p["pattern"])))
        fact_file = folder / "facts" / f"{rel}.jsonl"
        if not templates or not fact_file.exists():
            continue
        facts += _unambiguous(rel, _read_jsonl(fact_file), templates)
    if not facts:
        raise ValueError(f"no usable ParaRel facts in {folder} for relations {relations}")
    return facts


def _unambiguous(rel: str, rows: list[dict], templates: tuple[str, ...]) -> list[Fact]:
    """One fact per subject: repeated lines collapse, and a subject listed with several objects
    (e.g. two places called "Georgia") is dropped, since its prompts have more than one right
    answer and would count one of them wrong."""
    objects: dict[str, set[str]] = {}
    for r in rows:
        objects.setdefault(r["sub_label"], set()).add(r["obj_label"])
    return [Fact(rel, s, next(iter(o)), templates) for s, o in objects.items() if len(o) == 1]


def sample_facts(facts: list[Fact], n: int | None, seed: int = 0) -> list[Fact]:
    """``n`` facts spread evenly over relations (round robin over shuffled relations), seeded."""
    if not facts:
        raise ValueError("no facts to sample from")
    if n is not None and n < 1:
        raise ValueError(f"the number of facts must be at least 1, got {n}")
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    return round_robin(by_rel, n, seed)


def round_robin(groups: dict[str, list], n: int | None, seed: int = 0) -> list:
    """``n`` items (None: all) taken one group at a time, groups and the items within each in a
    seeded random order: an even spread over groups, and a smaller ``n`` takes the first items of
    a larger one."""
    rng = random.Random(seed)
    pools = [rng.sample(v, len(v)) for _, v in sorted(groups.items())]
    rng.shuffle(pools)
    out: list = []
    while pools and (n is None or len(out) < n):
        for pool in list(pools):
            if n is not None and len(out) >= n:
                break
            out.append(pool.pop())
            if not pool:
                pools.remove(pool)
    return out


def load_text(split: str = "test", root: str | os.PathLike | None = None, download: bool = True,
              base_url: str = WIKITEXT_URL) -> str:
    """WikiText-2 (the tokenized v1 release) ``test`` or ``valid`` split as one string."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    given = data_root(root)
    path = (given if given is not None else cache_dir()) / "wikitext-2" / f"{split}.txt"
    if not path.exists() and given is None and download:
        try:
            _fetch(f"{base_url}/{split}.txt", path)
        except OSError as err:
            warnings.warn(f"could not download WikiText-2 ({err}); using text built from the probe set", stacklevel=2)
    if not path.exists():
        if given is not None:
            raise FileNotFoundError(f"{path} not found under the data folder {given}")
        return _probe_text()
    return path.read_text(encoding="utf-8")


def _probe_text() -> str:
    lines = []
    for rel, pairs in probe.probe_facts().items():
        for i, (s, o) in enumerate(pairs):
            t = probe.TEMPLATES[rel][i % len(probe.TEMPLATES[rel])]
            lines.append(t.replace("[X]", s).replace("[Y]", o))
    return " ".join(lines)


def bos_id(tokenizer) -> int | None:
    """The BOS token id when ``tokenizer`` puts one at the start of every text by default (Gemma,
    Llama 3: their models always saw it there), else None (GPT-2, SmolLM2). Perplexity, KL and
    calibration windows follow the same rule."""
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return None
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None


def text_tokens(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text as one 1-D tensor of token ids, no BOS added."""
    if not text.strip():
        raise ValueError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_tokens(tokenizer, n_samples: int = 64, seq_len: int = 512, seed: int = 0,
                       root: str | os.PathLike | None = None) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from WikiText-2 valid, seeded: (n, seq_len);
    where the tokenizer adds a BOS to every text, each window is that BOS and ``seq_len - 1`` tokens."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 calibration sample of 2 tokens, got {n_samples} x {seq_len}")
    # only as much text as the windows need, tokenized once
    ids = text_tokens(tokenizer, load_text("valid", root))
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    bos = bos_id(tokenizer)
    n = seq_len if bos is None else seq_len - 1
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    windows = torch.stack([ids[s : s + n] for s in starts.tolist()])
    return windows if bos is None else torch.cat([torch.full((n_samples, 1), bos, dtype=windows.dtype), windows], 1)
