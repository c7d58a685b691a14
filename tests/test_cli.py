import json

import pandas as pd
import pytest

from qdiag.cli import main
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture
def local_model(tmp_path):
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def cliff_args(model, out, data_dir, *extra):
    return ["cliff", "--model", model, "--facts", "12", "--ppl-tokens", "300", "--ppl-window", "64",
            "--calib-samples", "4", "--calib-len", "32", "--data", str(data_dir), "--quiet", "--out", str(out),
            *extra]


def test_cliff_end_to_end(local_model, tmp_path, data_dir):
    out = tmp_path / "out"
    assert main(cliff_args(local_model, out, data_dir, "--bits", "16,4,2", "--method", "rtn,gptq",
                           "--group-size", "32")) == 0
    doc = json.loads((out / "cliff.json").read_text())
    rows = pd.DataFrame(doc["rows"])
    assert list(zip(rows.method, rows.bits)) == [("fp", 16), ("rtn", 4), ("rtn", 2), ("gptq", 4), ("gptq", 2)]
    for col in ("method", "bits", "group_size", "avg_bits", "ppl", "acc_any", "acc_any_lo", "acc_any_hi",
                "acc_majority", "acc_all", "median_rank", "n_facts", "quant_seconds"):
        assert col in rows
    assert (rows.n_facts == 12).all()
    assert rows.ppl.nunique() == 5  # every configuration ran with its own weights (a random model: no order)
    assert rows.avg_bits.tolist() == [16, 4.5, 2.5, 4.5, 2.5]  # + one 16-bit scale per 32 weights
    assert pd.read_csv(out / "cliff.csv").shape[0] == 5
    assert (out / "cliff.png").stat().st_size > 1000
    assert doc["meta"]["args"]["bits"] == [16, 4, 2]


@pytest.mark.parametrize("extra,message", [
    (["--bits", "16,9"], "bits must be in 2..8"),
    (["--group-size", "0"], "group size must be at least 1"),
    (["--method", "awq9"], "unknown method"),
])
def test_bad_arguments_are_refused(local_model, tmp_path, data_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(cliff_args(local_model, tmp_path / "out", data_dir, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_failure_leaves_nothing_on_disk(local_model, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    # group size 128 does not fit the tiny model's 64 inputs: refused before any work
    assert main(cliff_args(local_model, out, data_dir, "--bits", "4", "--group-size", "128")) == 2
    assert "larger than in_features=64" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_model(tmp_path, data_dir, capsys):
    assert main(cliff_args("not-a-model", tmp_path / "out", data_dir)) == 2
    assert "unknown model" in capsys.readouterr().err
