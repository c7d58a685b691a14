"""Every command end to end on a CUDA GPU, in float32 and bfloat16 (skipped where there is none).

Device and dtype mistakes do not depend on model size, so a tiny model that knows its facts will
find them; run ``python -m pytest -m gpu`` on a machine with a GPU (``QDIAG_TEST_DEVICE=cpu``
runs the same tests on the CPU, to check the tests themselves).
"""

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from qdiag.cli import main
from qdiag.testing import knowing

DEVICE = os.environ.get("QDIAG_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

COMMON = ["--method", "gptq", "--group-size", "32", "--facts", "20", "--ppl-tokens", "200", "--ppl-window", "50",
          "--calib-samples", "4", "--calib-len", "16", "--device", DEVICE, "--quiet"]
COMMANDS = {
    "cliff": (["--bits", "16,4,2"], "cliff.json"),
    "lens": (["--bits", "16,2"], "lens.json"),
    "causal": (["--bits", "2"], "causal.json"),
    "components": (["--bits", "16,2"], "components.json"),
    "representations": (["--bits", "16,2", "--k", "8"], "representations.json"),
    "sensitivity": (["--bits", "3"], "sensitivity.json"),
    "repair": (["--bits", "3", "--protect-k", "1", "--eora-ranks", "4"], "repair.json"),
    "diagnose": (["--bits", "8,2", "--try-remedy"], "diagnosis.json"),
}


@pytest.fixture(scope="module")
def knowing_model(tmp_path_factory):
    return knowing(tmp_path_factory.mktemp("gpu"), layers=4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_runs_on_the_gpu(knowing_model, tmp_path, command, dtype):
    model, data = knowing_model
    extra, name = COMMANDS[command]
    out = tmp_path / "out"
    args = [command, "--model", model, "--data", str(data), "--dtype", dtype, *COMMON, *extra, "--out", str(out)]
    assert main(args) == 0
    rows = pd.DataFrame(json.loads((out / name).read_text())["rows"])
    assert len(rows)
    numbers = rows.select_dtypes("number")
    assert not numbers.isin([math.inf, -math.inf]).any().any()
    if command in ("components", "representations"):  # the model against itself: identity values
        self = rows[rows.bits == 16]
        col = "mlp_cosine" if command == "components" else "subspace_sim"
        assert self[col].dropna().to_numpy() == pytest.approx(1, abs=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_quantizers_and_a_checkpoint_on_the_gpu(knowing_model, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdiag.testing import write_gguf

    model, data = knowing_model
    ckpt = write_gguf(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model),
                      tmp_path / "m.Q4_0.gguf", "Q4_0")
    common = ["--model", model, "--data", str(data), "--dtype", dtype, "--device", DEVICE, "--facts", "20",
              "--ppl-tokens", "200", "--ppl-window", "50", "--calib-samples", "4", "--calib-len", "16", "--quiet"]
    out = tmp_path / "cliff"
    assert main(["cliff", *common, "--bits", "16,4", "--method", "awq,hqq,q4_0,q5_1", "--group-size", "32",
                 "--quantized", str(ckpt), "--out", str(out)]) == 0
    rows = pd.DataFrame(json.loads((out / "cliff.json").read_text())["rows"])
    assert list(rows.method) == ["fp", "awq", "hqq", "q4_0", "q5_1", "gguf-Q4_0"]
    assert rows.ppl.notna().all() and not rows.ppl.isin([math.inf]).any()
    if dtype == "float32":  # the file's Q4_0 blocks and qdiag's, from the same float32 weights: one model
        assert rows.ppl.iloc[3] == pytest.approx(rows.ppl.iloc[5], rel=1e-3)
    assert main(["diagnose", *common, "--quantized", str(ckpt), "--evidence", "triage", "--out",
                 str(tmp_path / "diag")]) == 0


SHARDED = ["cliff", "lens", "causal", "components", "representations", "sensitivity", "repair", "diagnose"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("command", SHARDED)
def test_a_model_sharded_over_two_cards_gives_the_single_card_results(knowing_model, tmp_path, monkeypatch, command):
    """The embedding and the first half of the layers on card 0, the rest, the final norm and the
    unembedding on card 1: every number as on one card, and memory used on both."""
    import qdiag.experiment as experiment
    from qdiag.core.models import load_model

    model, data = knowing_model
    n_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
             **{f"model.layers.{i}": int(i >= n_layers // 2) for i in range(n_layers)}}
    monkeypatch.setattr(experiment, "load_model", lambda name, device_map=None, **kw: load_model(
        name, device_map=split if device_map == "sequential" else device_map, **kw))
    extra, name = COMMANDS[command]
    common = [a for a in COMMON if a not in ("--device", DEVICE)]
    results = {}
    for how, placement in (("one", ["--device", "cuda:0"]), ("two", ["--device-map", "sequential"])):
        out = tmp_path / how
        args = [command, "--model", model, "--data", str(data), *common, *extra, *placement, "--out", str(out)]
        assert main(args) == 0
        results[how] = json.loads((out / name).read_text())
    one, two = pd.DataFrame(results["one"]["rows"]), pd.DataFrame(results["two"]["rows"])
    numbers = [c for c in one.select_dtypes("number").columns if "seconds" not in c]  # timings differ
    pd.testing.assert_frame_equal(one[numbers], two[numbers], rtol=1e-3, atol=1e-4)
    peaks = results["two"]["meta"]["peak_gib_per_gpu"]
    assert len(peaks) >= 2 and peaks[0] > 0 and peaks[1] > 0


@pytest.mark.parametrize("group,order", [(128, "group"), (32, "natural"), (48, "natural"), (None, "natural"),
                                         (128, "act")], ids=["g128-group", "g32", "g48-straddles", "channel", "act"])
def test_gptq_replayed_as_cuda_graphs_gives_the_eager_codes(group, order):
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from qdiag.quant.gptq import gptq
    from qdiag.quant.quantize import QuantSpec

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 384, generator=g) * torch.linspace(0.2, 3.0, 384)
    H = (X.t() @ X / X.shape[0]).cuda()
    spec = QuantSpec(3, group, method="gptq")
    for seed in (1, 2):  # the second matrix of the same shape replays the graphs the first captured
        w = torch.randn(96, 384, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = gptq(w, H, spec, order=order, graphs=False)
        graph = gptq(w, H, spec, order=order, graphs=True)
        for part in ("codes", "scale", "zero"):
            assert torch.equal(getattr(eager, part), getattr(graph, part)), part


def test_an_svd_the_gpu_fails_to_converge_is_computed_on_the_cpu(monkeypatch):
    if DEVICE != "cuda":
        pytest.skip("the fallback is for a GPU's solver")
    from qdiag.quant import eora

    real = torch.linalg.svd

    def fails_on_gpu(M, full_matrices=True):
        if M.is_cuda:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 20)")
        return real(M, full_matrices=full_matrices)

    M = torch.randn(20, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.linalg, "svd", fails_on_gpu)
    U, S, Vh = eora.svd(M.cuda())
    assert U.is_cuda and S.is_cuda and Vh.is_cuda
    torch.testing.assert_close((U * S @ Vh).cpu(), M)
