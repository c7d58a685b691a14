"""The run store: work that several chapters and runs share (the known-fact screening, the
reference's and each configuration's scored prompts, perplexity), kept on disk under a key
computed from everything the result depends on: the model's weights, the tokenizer, the data,
the configuration and the code that computed it. A change to any of them gives a new key, so an
old entry is never read for new inputs; entries are written whole or not at all.

Where: ``$QDIAG_STORE``, else ``~/.cache/qdiag/store`` (``QDIAG_CACHE`` moves the cache);
``QDIAG_STORE=off`` turns the store off (everything is computed).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
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
    """A digest of the model's current parameters: every tensor's name, shape, dtype, sum, sum of
    squares and first values (a change of any weight moves the sums; hashing every byte of an 8B
    model would take a minute). Remembered per model until a parameter is replaced or written in
    place (torch counts in-place writes; writes through ``.data`` bypass that count, and qdiag
    never makes them after loading)."""
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
        # in float64 a slice at a time: a whole float64 copy of an 8B model's embedding is 3.9 GiB
        sums = [torch.stack([c.double().sum(), c.double().square().sum()]) for c in x.reshape(-1).split(_SLICE)]
        stats = torch.stack(sums).sum(0).cpu().numpy()
        h.update(repr((name, tuple(x.shape), str(x.dtype))).encode())
        h.update(stats.tobytes() + x.flatten()[:64].float().cpu().numpy().tobytes())
    _DIGESTS[hf] = (state, h.hexdigest())
    return _DIGESTS[hf][1]


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SLICE = 1 << 24  # elements summed at once by weights_digest (128 MiB in float64)


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
    return None if base is None else base / kind / f"{key}.pkl"


def load(kind: str, key: str) -> object | None:
    """The entry ``kind/key``, or None when it is not stored (or the store is off)."""
    path = _path(kind, key)
    if path is None or not path.exists():
        return None
    return pd.read_pickle(path)


def save(kind: str, key: str, value: object) -> None:
    """Store ``value`` (a data frame or anything picklable) as ``kind/key``, whole or not at all."""
    path = _path(kind, key)
    if path is None:
        return
    buf = io.BytesIO()
    pd.to_pickle(value, buf)
    atomic_write_bytes(path, buf.getvalue())


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
