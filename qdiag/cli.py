"""``qdiag`` on the command line: one subcommand per analysis, named as its module, its notebook
and its result file, each writing ``DIR/<name>.json`` (with a ``rows`` list), the same rows as
CSV, and figures.

    qdiag cliff --model smollm2-135m --bits 16,8,4,3,2 --method rtn,gptq --out results/
    qdiag lens --bits 16,4,2 --method gptq --out results/
    qdiag causal --bits 4,2 --method gptq --positions last_subject,last --window 1 --out results/
    qdiag components --bits 16,4,2 --method gptq --positions last_subject,last --out results/
    qdiag representations --bits 16,4,2 --method gptq --k 50 --out results/
    qdiag sensitivity --bits 4 --method gptq --scopes layer,weight_type,prefix --out results/
    qdiag repair --bits 4 --method gptq --protect-k 1,2 --kurtosis 5 --eora-ranks 16 --out results/
    qdiag sweep sweep.yml

The analyses' subcommands live in ``qdiag.commands`` (which the sweep's jobs run too); this module
adds ``sweep`` on top.
"""

from __future__ import annotations

# Each command imports its analysis (pandas, matplotlib, transformers, nnsight) when it runs, so
# that `qdiag --help` and refusals of bad input come at once.
import argparse
import sys
from pathlib import Path

from . import commands


def _sweep(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser("sweep", help="a manifest of models x methods x widths x analyses, run as jobs on Ray")
    sw.add_argument("manifest", type=Path, help="YAML or JSON manifest (see the README)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.add_argument("--check", action="store_true", help="check the manifest and list its jobs; run nothing")
    sw.add_argument("--summary", action="store_true",
                    help="print the finished jobs' verdicts and key numbers side by side (also OUT/summary.csv)")
    sw.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    """The ``qdiag`` program's parser: every analysis, and ``sweep``."""
    return commands.parser(extra=_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    manifest = sweep.read(args.manifest)
    todo = [j for j in manifest.jobs if not sweep.finished(j, manifest.out)]
    print(f"{len(manifest.jobs)} jobs, {len(manifest.jobs) - len(todo)} finished before, results in {manifest.out}",
          file=sys.stderr)
    if args.check:
        for j in manifest.jobs:
            print(" ".join(["qdiag", *j.command()]))
        return 0
    if args.summary:
        from .core.io import write_csv

        table = sweep.collect(manifest)
        if table.empty:
            print("no finished job with a summary (diagnose, cliff) yet", file=sys.stderr)
            return 1
        write_csv(manifest.out / "summary.csv", table)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        return 0
    summary = sweep.run(manifest, progress=not args.quiet)
    for f in summary["failed"]:
        print(f"failed: {f['job']}: {f['error']}", file=sys.stderr)
    print(f"done {len(summary['done'])}, skipped {summary['skipped']}, failed {len(summary['failed'])}",
          file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    return commands.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
