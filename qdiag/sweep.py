"""Sweeps: a manifest of models x methods x widths x group sizes x seeds x analyses, expanded into
independent jobs and run on Ray, locally or on a cluster, unchanged.

    qdiag sweep sweep.yml

Each job is one ``qdiag <analysis>`` command for one configuration; it writes to a deterministic
folder ``OUT/<model>/<analysis>/<method>-w<bits>-g<group>-s<seed>/`` and, last, ``job.json``, the
mark of a finished job. A sweep skips finished jobs, so one that was interrupted resumes where it
stopped; a failing job is retried ``retries`` times, then reported in ``OUT/sweep.json`` beside
the others. The manifest is checked whole before anything starts. Ray is an optional extra
(``pip install qdiag[sweep]``)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from .core.io import atomic_write_bytes, write_json

# ray.init's options for a run that keeps its output to the progress bar (the book's pages)
QUIET = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
# The analyses a job can run: the commands of the command line.
ANALYSES = ("cliff", "lens", "causal", "components", "representations", "sensitivity", "repair", "diagnose")
KEYS = {"models", "methods", "bits", "group_sizes", "seeds", "analyses", "options", "out", "retries", "address",
        "gpus_per_job", "cpus_per_job"}


@dataclass(frozen=True)
class Job:
    """One command of the sweep: what it runs and where its results go."""

    model: str
    analysis: str
    method: str
    bits: int
    group_size: int | None
    seed: int
    options: tuple = ()

    @property
    def name(self) -> str:
        return f"{self.method}-w{self.bits}-g{self.group_size or 'ch'}-s{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / _slug(self.model) / self.analysis / self.name

    def command(self) -> list[str]:
        """The job's command, without where it runs and writes (what makes two jobs the same)."""
        return [self.analysis, "--model", self.model, "--method", self.method, "--bits", str(self.bits),
                "--group-size", str(self.group_size or "channel"), "--seed", str(self.seed), *self.options]

    def args(self, out: Path, device: str) -> list[str]:
        return [*self.command(), "--device", device, "--quiet", "--out", str(self.folder(out))]


@dataclass
class Manifest:
    """A checked manifest (``read``)."""

    jobs: list[Job]
    out: Path
    retries: int = 1
    address: str | None = None
    gpus_per_job: float = 0
    cpus_per_job: float = 1


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("_") or "model"


def _list(doc: dict, key: str, default: list) -> list:
    value = doc.get(key, default)
    return value if isinstance(value, list) else [value]


def read(path: str | Path) -> Manifest:
    """The manifest at ``path`` (YAML or JSON), checked whole (``check``); a relative ``out`` is
    relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no manifest at {path}")
    return check(yaml.safe_load(path.read_text()) or {}, path.resolve().parent, str(path))


def write(doc: dict, path: str | Path) -> Path:
    """Save a manifest (a mapping, as ``check`` takes it) as YAML, so that ``qdiag sweep PATH`` reruns it."""
    path = Path(path)
    check(doc, path.resolve().parent, str(path))
    atomic_write_bytes(path, yaml.safe_dump(doc, sort_keys=False).encode())
    return path


def _flags(options: dict) -> list[str]:
    flat: list[str] = []
    for k, v in sorted(options.items()):
        flag = f"--{k.replace('_', '-')}"
        if v is True:
            flat.append(flag)
        elif v is not False and v is not None:
            flat += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return flat


def check(doc: dict, base: Path = Path("."), where: str = "manifest") -> Manifest:
    """A manifest from its mapping, checked whole: unknown keys, models, methods, widths, group sizes,
    analyses and options are errors that name what is wrong, before any job runs. ``options`` are
    every job's command-line options; an analysis's name as a key holds options for its jobs alone
    (``{known: 40, diagnose: {evidence: triage}}``)."""
    from .commands import parser
    from .core.models import ModelNotFoundError, locate
    from .quant.quantize import QuantSpec

    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a manifest is a mapping of keys ({', '.join(sorted(KEYS))})")
    errors = [f"unknown key {k!r} (known: {', '.join(sorted(KEYS))})" for k in doc if k not in KEYS]
    models = _list(doc, "models", [])
    if not models:
        errors.append("no models: give at least one under 'models'")
    for m in models:
        try:
            locate(str(m))
        except ModelNotFoundError as e:
            errors.append(f"model {m!r}: {e}")
    analyses = _list(doc, "analyses", ["diagnose"])
    errors += [f"unknown analysis {a!r} (one of {', '.join(ANALYSES)})" for a in analyses if a not in ANALYSES]
    methods = _list(doc, "methods", ["rtn"])
    bits = _list(doc, "bits", [4, 2])
    groups = [None if g in (None, 0) else g for g in _list(doc, "group_sizes", [128])]
    for m, b, g in itertools.product(methods, bits, groups):
        try:
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError("bits are whole numbers, like 4")
            QuantSpec(b, g, method=str(m))
        except (ValueError, TypeError) as e:
            errors.append(f"width {b!r} with method {m!r} and group size {g}: {e}")
    seeds = _list(doc, "seeds", [0])
    options = doc.get("options", {}) or {}
    if not isinstance(options, dict):
        errors.append("'options' is a mapping of command-line options to values, like {facts: 40}")
        options = {}
    shared = {k: v for k, v in options.items() if not isinstance(v, dict)}
    own = {k: v for k, v in options.items() if isinstance(v, dict)}
    errors += [f"options for {k!r}: not an analysis (one of {', '.join(ANALYSES)})" for k in own if k not in ANALYSES]
    flags = {a: _flags({**shared, **own.get(a, {})}) for a in analyses if a in ANALYSES}
    for a, flat in flags.items():
        taken = [k for k in {**shared, **own.get(a, {})} if k in {"model", "method", "bits", "group-size",
                                                                  "group_size", "seed", "out", "device"}]
        errors += [f"option {k!r} is set by the sweep itself; use the manifest's own key" for k in taken]
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                _, unknown = parser().parse_known_args([a, *flat, "--out", "x"])
        except SystemExit:  # argparse's way of refusing a value
            errors.append(f"qdiag {a} refuses the options {' '.join(flat)}: {said.getvalue().strip().splitlines()[-1]}")
            continue
        errors += [f"qdiag {a} has no option {u}" for u in unknown if u.startswith("--")]
    if errors:
        raise ValueError(f"{where}: the manifest has {len(errors)} problem(s), nothing was run:\n  - "
                         + "\n  - ".join(dict.fromkeys(errors)))
    jobs = [Job(str(m), a, str(me), int(b), g, int(s), tuple(flags[a]))
            for m, a, me, b, g, s in itertools.product(models, analyses, methods, bits, groups, seeds)]
    out = Path(doc.get("out", "results/sweep"))
    if not out.is_absolute():
        out = Path(base).resolve() / out
    return Manifest(jobs, out, int(doc.get("retries", 1)), doc.get("address"), float(doc.get("gpus_per_job", 0)),
                    float(doc.get("cpus_per_job", 1)))


def finished(job: Job, out: Path) -> bool:
    """Whether ``job`` ran to the end before, with the same command."""
    mark = job.folder(out) / "job.json"
    if not mark.exists():
        return False
    try:
        return json.loads(mark.read_text()).get("command") == job.command()
    except (OSError, json.JSONDecodeError):
        return False


def run_job(job: Job, out: Path, device: str) -> dict:
    """Run one job in this process: the analysis's command, then its mark of completion."""
    from .commands import run as run_command

    started = time.time()
    code = run_command(job.args(out, device))
    if code != 0:
        raise RuntimeError(f"qdiag {job.analysis} exited with {code}")
    finished_at = time.time()
    record = {"command": job.command(), "device": device, "host": platform.node(),
              "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "seconds": round(finished_at - started, 1),
              "started_at": started, "finished_at": finished_at, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(job.folder(out) / "job.json", record)
    return record


def run(manifest: Manifest, progress: bool = True, ray_init: dict | None = None) -> dict:
    """Run every unfinished job of ``manifest`` on Ray (``manifest.address``: an existing cluster;
    None: a local instance); returns the summary also written to ``OUT/sweep.json``."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("sweeps run on Ray, an optional extra: pip install 'qdiag[sweep]'") from e
    from tqdm.auto import tqdm

    out = manifest.out
    todo = [j for j in manifest.jobs if not finished(j, out)]
    skipped = len(manifest.jobs) - len(todo)
    device = "cuda" if manifest.gpus_per_job else "cpu"
    summary = {"jobs": len(manifest.jobs), "skipped": skipped, "done": [], "failed": []}
    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=manifest.address, **(ray_init or {}))
        task = ray.remote(num_cpus=manifest.cpus_per_job, num_gpus=manifest.gpus_per_job,
                          max_retries=manifest.retries, retry_exceptions=True)(run_job)
        pending = {task.remote(j, out, device): j for j in todo}
        bar = tqdm(total=len(todo), desc="sweep", disable=not progress, file=sys.stderr)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    ray.get(ready[0])
                    summary["done"].append(str(job.folder(out).relative_to(out)))
                except Exception as e:  # the job failed after its retries: report it, go on
                    summary["failed"].append({"job": str(job.folder(out).relative_to(out)),
                                              "error": str(e).strip().splitlines()[-1][:500]})
                bar.update(1)
                bar.set_postfix(done=len(summary["done"]), running=min(len(pending), _slots()),
                                failed=len(summary["failed"]))
        finally:
            bar.close()
            if started_here:
                ray.shutdown()
    write_json(out / "sweep.json", summary)
    return summary


def _slots() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


# What a summary keeps of each finished job: the diagnosis's verdicts, the cliff's key numbers.
SUMMARY = {"diagnose": ("diagnosis.json", "configurations",
                        ["avg_bits", "verdict", "score", "score_lo", "score_hi", "lost", "first_domino"]),
           "cliff": ("cliff.json", "rows", ["avg_bits", "ppl", "kl", "retention", "acc_any"])}


def collect(manifest: Manifest) -> pd.DataFrame:
    """One row per finished job of ``manifest`` and configuration it reports, for the analyses with a
    summary (``diagnose``: verdict, score, answers lost; ``cliff``: perplexity, KL, retention), the
    models and widths side by side; jobs that did not finish are left out."""
    rows = []
    for job in manifest.jobs:
        if job.analysis not in SUMMARY or not finished(job, manifest.out):
            continue
        name, key, columns = SUMMARY[job.analysis]
        doc = json.loads((job.folder(manifest.out) / name).read_text())
        for entry in doc[key]:
            if entry.get("method") in ("fp", None) or entry.get("remedy_of"):
                continue  # the reference and the diagnosis's repaired variants
            rows.append({"model": job.model, "analysis": job.analysis, "method": entry["method"],
                         "bits": entry["bits"], "group_size": entry.get("group_size"), "seed": job.seed,
                         **{c: entry.get(c) for c in columns}})
    return pd.DataFrame(rows)


def timeline(manifest: Manifest) -> pd.DataFrame:
    """The finished jobs' records (job, host, visible devices, start, seconds) and, per job, how many
    jobs were running when it started: how far the sweep really ran in parallel."""
    marks = []
    for job in manifest.jobs:
        if finished(job, manifest.out):
            mark = json.loads((job.folder(manifest.out) / "job.json").read_text())
            marks.append({"job": str(job.folder(manifest.out).relative_to(manifest.out)), "host": mark.get("host"),
                          "visible_devices": mark.get("visible_devices"), "started_at": mark["started_at"],
                          "finished_at": mark["finished_at"], "seconds": mark["seconds"]})
    t = pd.DataFrame(marks, columns=["job", "host", "visible_devices", "started_at", "finished_at", "seconds"])
    t["running"] = [int(((t.started_at <= s) & (t.finished_at > s)).sum()) for s in t.started_at]
    return t.sort_values("started_at", ignore_index=True)


def side_by_side(table: pd.DataFrame) -> pd.DataFrame:
    """``collect``'s rows merged into one row per model and configuration: the diagnosis's verdict
    next to the cliff's perplexity, KL and retention (where both analyses ran)."""
    keys = ["model", "method", "bits", "group_size", "seed"]
    if table.empty:
        return table
    parts = []
    for a in ("diagnose", "cliff"):
        part = table[table.analysis == a].drop(columns="analysis")
        if len(part):  # each analysis keeps its own columns (the other's are empty in its rows)
            parts.append(part[[c for c in part if c in keys or part[c].notna().any()]])
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part, on=keys, how="outer", suffixes=("", "_cliff"))
    if "avg_bits_cliff" in merged:
        merged["avg_bits"] = merged.avg_bits.fillna(merged.pop("avg_bits_cliff"))
    return merged.sort_values(["model", "method", "bits"], ascending=[True, True, False], ignore_index=True)
