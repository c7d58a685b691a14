"""The run store: work that several chapters and runs share (the known-fact screening, the
reference's and each configuration's scored prompts, perplexity), kept on disk under a key
computed from everything the result depends on: the model's weights, the tokenizer, the data,
the configuration and the code that computed it. A change to any of them gives a new key, so an
old entry is never read for new inputs; entries are written whole or not at all.

Entries are JSON, never pickles: a folder someone else can write to (a CI cache, a shared disk)
can at worst make qdiag recompute, never run code. Each file records its kind and key; one that
does not parse, or whose recorded key is not the one asked for, is ignored with a warning and the
result is computed again. Tables keep their columns' dtypes and every float exactly (JSON writes a
float's shortest round-trip form).

Where: ``$QDIAG_STORE``, else ``~/.cache/qdiag/store`` (``QDIAG_CACHE`` moves the cache);
``QDIAG_STORE=off`` turns the store off (everything is computed).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import FunctionType, ModuleType

import pandas as pd
import torch
from torch import nn

from .arch import unwrap
from .data import cache_dir
from .io import atomic_write_bytes

FORMAT = 1  # the entries' layout; another number is a miss

OFF = ("off", "0", "none", "false")


def root() -> Path | None:
    """The store's folder, or None when the store is off."""
    value = os.environ.get("QDIAG_STORE")
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    return cache_dir() / "store"


def digest(*parts: object) -> str:
    """A short hex digest of ``parts``: tensors and arrays by their bytes, shapes and dtypes, data
    frames by their values, modules and functions by their source, anything else by ``repr``."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(type(p).__name__.encode())
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(p, pd.DataFrame):
            h.update(pd.util.hash_pandas_object(p, index=False).to_numpy().tobytes())
            h.update(repr(list(p.columns)).encode())
        elif isinstance(p, (ModuleType, FunctionType)):
            h.update(inspect.getsource(p).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """A digest of the model's current parameters that sees where every value sits: each tensor's
    name, shape and dtype, and its bytes hashed with blake2b on the CPU, or, on an accelerator, its
    dot products in float64 with a fixed pseudo-random vector of its own size generated on that
    device (no copy leaves the card; a permuted row or two swapped values move the dot product).
    Remembered per model until a parameter is replaced or written in place (torch counts in-place
    writes; writes through ``.data`` bypass that count, and qdiag never makes them after loading)."""
    hf = unwrap(model)
    state = tuple((n, p.data_ptr(), p._version) for n, p in hf.named_parameters())
    seen = _DIGESTS.get(hf)
    if seen is not None and seen[0] == state:
        return seen[1]
    h = hashlib.blake2b(digest_size=16)
    for name, p in hf.named_parameters():
        x = p.detach()
        if x.is_meta:
            raise ValueError(f"parameter {name} is on the meta device (offloaded); the store cannot key it")
        h.update(repr((name, tuple(x.shape), str(x.dtype), x.device.type)).encode())
        h.update(tensor_fingerprint(x))
    _DIGESTS[hf] = (state, h.hexdigest())
    return _DIGESTS[hf][1]


def tensor_fingerprint(x: torch.Tensor, project: bool | None = None) -> bytes:
    """What ``weights_digest`` hashes of one tensor: a blake2b digest of its bytes on the CPU; on an
    accelerator (or with ``project=True``), its float64 dot products, a slice at a time, with
    pseudo-random vectors drawn on the device from a fixed seed per slice (so the same values in
    the same places give the same bytes)."""
    flat = x.reshape(-1)
    if not (x.device.type != "cpu" if project is None else project):
        # hashed in place, through the buffer protocol: no copy of the bytes
        return hashlib.blake2b(flat.contiguous().view(torch.uint8).numpy(), digest_size=16).digest()
    dots = []
    g = torch.Generator(device=x.device)
    for i, c in enumerate(flat.split(_SLICE)):
        g.manual_seed(i)
        r = torch.rand(c.numel(), generator=g, device=x.device, dtype=torch.float64)
        dots.append(torch.dot(c.double(), r))
    return torch.stack(dots).cpu().numpy().tobytes() if dots else b""


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SLICE = 1 << 24  # elements projected at once on an accelerator (128 MiB per float64 vector)


def tokenizer_digest(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary and special tokens (what turns prompts into ids)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return digest(vocab, tokenizer.all_special_tokens, getattr(tokenizer, "bos_token_id", None),
                  type(tokenizer).__name__)


def model_digest(model: nn.Module) -> str:
    """Weights and tokenizer together: what a model's answers depend on besides its input."""
    return digest(weights_digest(model), tokenizer_digest(model.tokenizer))


def code_digest(*code: ModuleType | FunctionType) -> str:
    """The code a result depends on: the source of the given modules or functions (the functions
    that compute it, so that an unrelated edit elsewhere in their module keeps the entries), qdiag's
    version, and the torch and transformers versions that run the model."""
    from importlib.metadata import PackageNotFoundError, version

    def _v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return ""

    return digest(*code, _v("qdiag"), _v("torch"), _v("transformers"))


def _path(kind: str, key: str) -> Path | None:
    base = root()
    return None if base is None else base / kind / f"{key}.json"


def load(kind: str, key: str) -> object | None:
    """The entry ``kind/key``, or None when it is not stored (or the store is off). An entry that
    does not parse, or that records another kind or key, is ignored with a warning (and computed
    again by ``cached``); nothing in the store is ever executed."""
    path = _path(kind, key)
    if path is None or not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") != kind \
                or doc.get("key") != key:
            raise ValueError("it records another kind, key or format")
        return _decode(doc["value"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        warnings.warn(f"run store: ignoring {path} ({type(err).__name__}: {err}); it will be computed again",
                      stacklevel=2)
        return None


def save(kind: str, key: str, value: object) -> None:
    """Store ``value`` (a data frame, or numbers, strings, lists and dicts of them) as ``kind/key``,
    whole or not at all."""
    path = _path(kind, key)
    if path is None:
        return
    doc = {"format": FORMAT, "kind": kind, "key": key, "value": _encode(value)}
    atomic_write_bytes(path, json.dumps(doc, allow_nan=True).encode())


def _encode(value: object) -> object:
    """A JSON-able form of ``value``; data frames by column, with their dtypes and index."""
    if isinstance(value, pd.DataFrame):
        index = None if value.index.equals(pd.RangeIndex(len(value))) else value.index.tolist()
        return {"__frame__": {"columns": [str(c) for c in value.columns],
                              "dtypes": [str(t) for t in value.dtypes],
                              "data": [_plain(value[c].tolist()) for c in value.columns], "index": index}}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # a numpy scalar
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the run store keeps tables, numbers and strings, not {type(value).__name__}")


def _plain(values: list) -> list:
    return [v.item() if hasattr(v, "item") else v for v in values]


def _decode(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"__frame__"}:
        f = value["__frame__"]
        if len(f["columns"]) != len(f["dtypes"]) or len(f["columns"]) != len(f["data"]):
            raise ValueError("a table's columns, dtypes and data differ in number")
        df = pd.DataFrame({c: pd.Series(d, dtype=t) for c, t, d in zip(f["columns"], f["dtypes"], f["data"])},
                          columns=f["columns"])
        if f.get("index") is not None:
            df.index = f["index"]
        return df
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def cached(kind: str, key: str | None, compute: Callable[[], object]) -> object:
    """``compute()``, read from the store when ``kind/key`` is there, stored when it is not;
    ``key=None`` (something the store cannot key) always computes."""
    if key is not None:
        hit = load(kind, key)
        if hit is not None:
            return hit
    value = compute()
    if key is not None:
        save(kind, key, value)
    return value
