"""Sweeps: the manifest is checked whole before anything runs; jobs run on a real local Ray instance,
two at once on two cores; a finished job is skipped when the sweep runs again (an interrupted sweep
resumes), and a failing job is retried, then reported beside the others."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from qdiag import sweep
from qdiag.cli import main
from qdiag.testing import knowing


def write(tmp_path, **doc):
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_manifest_is_checked_whole_and_nothing_runs(tmp_path, capsys):
    path = write(tmp_path, models=["no-such-model"], analyses=["lens", "surgery"], bits=[4, 0], methods=["rtn"],
                 colour="blue", out="out")
    with pytest.raises(ValueError) as err:
        sweep.read(path)
    text = str(err.value)
    for what in ("no-such-model", "surgery", "width 0", "colour", "nothing was run"):
        assert what in text
    assert main(["sweep", str(path)]) == 2  # the command line says the same and runs nothing
    assert "surgery" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_jobs_expand_to_one_folder_each(tmp_path):
    model, data = knowing(tmp_path / "m")
    path = write(tmp_path, models=[model], analyses=["lens", "diagnose"], methods=["rtn", "gptq"], bits=[4, 2],
                 group_sizes=[128, None], seeds=[0], options={"data": str(data), "facts": 20}, out="out")
    m = sweep.read(path)
    assert len(m.jobs) == 2 * 2 * 2 * 2
    folders = {j.folder(m.out) for j in m.jobs}
    assert len(folders) == len(m.jobs)  # no two jobs write to the same place
    job = next(j for j in m.jobs if j.analysis == "lens" and j.method == "gptq" and j.bits == 2 and j.group_size)
    assert job.folder(m.out) == tmp_path / "out" / sweep._slug(model) / "lens" / "gptq-w2-g128-s0"
    assert job.command()[:4] == ["lens", "--model", model, "--method"] and "--data" in job.command()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sweep_runs_on_ray_resumes_and_reports_a_failure(tmp_path):
    pytest.importorskip("ray", reason="sweeps need Ray: pip install 'qdiag[sweep]'")
    model, data = knowing(tmp_path / "m", layers=2)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    path = write(tmp_path, models=[model, str(broken)], analyses=["lens"], methods=["rtn"], bits=[4, 2],
                 group_sizes=[32], options={"data": str(data), "facts": 20, "known": 10}, retries=1, out="out")
    m = sweep.read(path)
    first = sweep.run(m, progress=False, ray_init={"num_cpus": 2, "include_dashboard": False})
    assert len(first["done"]) == 2 and len(first["failed"]) == 2 and first["skipped"] == 0
    assert all("broken" in f["job"] for f in first["failed"])
    assert json.loads((m.out / "sweep.json").read_text()) == first
    good = [j for j in m.jobs if j.model == model]
    marks = [json.loads((j.folder(m.out) / "job.json").read_text()) for j in good]
    assert all((j.folder(m.out) / "lens.json").exists() for j in good)
    overlap = min(k["finished_at"] for k in marks) > max(k["started_at"] for k in marks)
    assert overlap, "the two jobs ran at the same time, one per core"

    (good[1].folder(m.out) / "job.json").unlink()  # as if the sweep had stopped during this job
    second = sweep.run(m, progress=False, ray_init={"num_cpus": 2, "include_dashboard": False})
    assert second["skipped"] == 1 and second["done"] == [str(good[1].folder(m.out).relative_to(m.out))]
    assert json.loads((good[0].folder(m.out) / "job.json").read_text()) == marks[0]  # not run again


def test_a_summary_puts_finished_jobs_side_by_side(tmp_path, capsys):
    """Finished diagnose jobs (their results written by hand here, as the command writes them) in one
    table, the reference and repaired variants left out; an unfinished job is not in it."""
    model, data = knowing(tmp_path / "m")
    path = write(tmp_path, models=[model], analyses=["diagnose"], bits=[4, 2], group_sizes=[32],
                 options={"data": str(data)}, out="out")
    m = sweep.read(path)
    done, unfinished = m.jobs
    folder = done.folder(m.out)
    folder.mkdir(parents=True)
    entry = {"method": "rtn", "bits": 4, "group_size": 32, "avg_bits": 4.5, "verdict": "signal_degradation",
             "score": 0.2, "score_lo": 0.1, "score_hi": 0.3, "lost": 0.4, "first_domino": None, "remedy_of": None}
    remedy = {**entry, "method": "rtn+eora", "remedy_of": {"method": "rtn"}}
    (folder / "diagnosis.json").write_text(json.dumps({"configurations": [entry, remedy]}))
    (folder / "job.json").write_text(json.dumps({"command": done.command()}))
    table = sweep.collect(m)
    assert table[["model", "bits", "verdict", "score"]].values.tolist() == [[model, 4, "signal_degradation", 0.2]]
    assert main(["sweep", str(path), "--summary"]) == 0
    assert "signal_degradation" in capsys.readouterr().out
    assert (m.out / "summary.csv").exists()


def test_options_of_one_analysis_reach_only_its_jobs_and_unknown_options_are_refused(tmp_path):
    model, data = knowing(tmp_path / "m")
    m = sweep.check({"models": [model], "analyses": ["cliff", "diagnose"], "bits": [4],
                     "options": {"known": 10, "diagnose": {"evidence": "triage"}}}, tmp_path)
    cliff, diagnose = m.jobs
    assert "--evidence" not in cliff.command() and diagnose.command()[-4:] == ["--evidence", "triage", "--known", "10"]
    with pytest.raises(ValueError) as err:  # cliff has no --evidence; --known takes a number; no analysis "surgery"
        sweep.check({"models": [model], "analyses": ["cliff"], "options": {"evidence": "triage", "surgery": {"x": 1}}})
    assert "qdiag cliff has no option --evidence" in str(err.value) and "'surgery'" in str(err.value)
    with pytest.raises(ValueError, match="--known: expected"):
        sweep.check({"models": [model], "options": {"known": "many"}})


def test_a_written_manifest_reads_back_and_a_bad_one_is_not_written(tmp_path):
    model, _ = knowing(tmp_path / "m")
    doc = {"models": [model], "bits": [4, 2], "analyses": ["lens"], "out": "out"}
    path = sweep.write(doc, tmp_path / "a" / "sweep.yml")
    m = sweep.read(path)
    assert [j.bits for j in m.jobs] == [4, 2] and m.out == (tmp_path / "a" / "out").resolve()
    with pytest.raises(ValueError, match="width 0"):
        sweep.write({**doc, "bits": [0]}, tmp_path / "b" / "sweep.yml")
    assert not (tmp_path / "b").exists()


def _finish(job, out, results: dict, started: float, seconds: float, devices=None):
    folder = job.folder(out)
    folder.mkdir(parents=True)
    for name, doc in results.items():
        (folder / name).write_text(json.dumps(doc))
    (folder / "job.json").write_text(json.dumps({"command": job.command(), "started_at": started, "seconds": seconds,
                                                 "finished_at": started + seconds, "visible_devices": devices}))


def test_the_cliff_and_the_diagnosis_of_a_configuration_share_a_row_and_the_timeline_counts_overlaps(tmp_path):
    model, data = knowing(tmp_path / "m")
    m = sweep.check({"models": [model], "analyses": ["diagnose", "cliff"], "bits": [4, 2], "group_sizes": [32],
                     "options": {"data": str(data)}, "out": "out"}, tmp_path)
    d4, d2, c4, c2 = m.jobs
    verdict = {"method": "rtn", "group_size": 32, "avg_bits": 4.5, "score": 0.2, "score_lo": 0.1, "score_hi": 0.3,
               "lost": 0.4, "first_domino": None, "remedy_of": None}
    four = {**verdict, "bits": 4, "verdict": "signal_degradation"}
    _finish(d4, m.out, {"diagnosis.json": {"configurations": [four]}}, started=0, seconds=10, devices="0")
    _finish(d2, m.out, {"diagnosis.json": {"configurations": [{**verdict, "bits": 2, "verdict": "computation_collapse",
                                                                "score": 0.7}]}}, started=5, seconds=10, devices="1")
    _finish(c4, m.out, {"cliff.json": {"rows": [{"method": "fp", "bits": 16, "ppl": 10.0},
                                                {"method": "rtn", "bits": 4, "group_size": 32, "avg_bits": 4.5,
                                                 "ppl": 12.0, "kl": 0.1, "retention": 0.8}]}}, started=20, seconds=1)
    table = sweep.side_by_side(sweep.collect(m))  # c2 did not finish: its row has the diagnosis alone
    assert table[["bits", "verdict", "ppl"]].fillna(-1).values.tolist() == [[4, "signal_degradation", 12.0],
                                                                            [2, "computation_collapse", -1]]
    runs = sweep.timeline(m)
    assert runs.running.tolist() == [1, 2, 1] and runs.visible_devices.tolist()[:2] == ["0", "1"]
    per_channel = table.assign(group_size=None)  # one scale per output channel: no group size in any row
    assert len(sweep.side_by_side(pd.concat([per_channel.assign(analysis="diagnose")[["model", "method", "bits",
                                            "group_size", "seed", "verdict", "analysis"]],
                                             per_channel.assign(analysis="cliff")[["model", "method", "bits",
                                            "group_size", "seed", "ppl", "analysis"]]]))) == 2
