"""Sweeps: the manifest is checked whole before anything runs; jobs run on a real local Ray instance,
two at once on two cores; a finished job is skipped when the sweep runs again (an interrupted sweep
resumes), and a failing job is retried, then reported beside the others."""

import json
import shutil

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
