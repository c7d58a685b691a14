import pytest
import torch

from qdiag.core.arch import resolve, unwrap
from qdiag.core.models import ModelNotFoundError, check_placement, load_model, locate, parse_max_memory
from qdiag.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def local_model(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_local_folder_loads_wrapped_for_nnsight(local_model):
    lm = load_model(str(local_model))
    assert resolve(lm).family == "qwen3"
    assert lm.tokenizer.padding_side == "left"
    with lm.trace("the capital of France is"):
        hidden = lm.model.layers[1].output.save()
    assert hidden.shape[-1] == 64
    assert not any(p.requires_grad for p in unwrap(lm).parameters())


@pytest.mark.parametrize("name,match", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing.gguf", "no GGUF file"),
])
def test_bad_names_say_what_to_do(name, match):
    with pytest.raises(ModelNotFoundError, match=match):
        locate(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        locate(str(tmp_path))


def test_hub_ids_pass_through():
    assert locate("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    assert locate("llama-3.1-8b") == ("meta-llama/Llama-3.1-8B", None)


def test_bad_dtype_and_device(local_model):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(local_model), dtype="int4")


def test_max_memory_is_read_as_accelerate_takes_it():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=10GiB") == {0: "70GiB", 1: "70GiB", "cpu": "10GiB"}
    assert parse_max_memory(None) is None and parse_max_memory({0: "1GiB"}) == {0: "1GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("0:70GiB")


def test_a_device_map_loads_the_same_model(local_model):
    plain, mapped = load_model(str(local_model)), load_model(str(local_model), device_map="auto")
    assert {p.device.type for p in unwrap(mapped).parameters()} == {"cpu"}  # accelerate's placement, no GPU here
    ids = plain.tokenizer("the capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(unwrap(mapped)(ids).logits, unwrap(plain)(ids).logits)


def test_bad_placement_options_say_what_to_do(local_model):
    with pytest.raises(ValueError, match="device_map must be one of"):
        load_model(str(local_model), device_map="everywhere")
    with pytest.raises(ValueError, match="give a device_map too"):
        load_model(str(local_model), max_memory="0=1GiB")


def test_offloaded_weights_are_refused():
    hf = tiny_model("llama")
    check_placement(hf)  # every weight resident: fine
    hf.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    with pytest.raises(ValueError, match="--max-memory"):
        check_placement(hf)
    hf = tiny_model("llama")
    hf.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match="down_proj"):
        check_placement(hf)



def test_progress_false_silences_the_gguf_loader(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from qdiag.core.models import _gguf_bar

    bar = gguf_utils.tqdm
    with _gguf_bar(False):
        list(gguf_utils.tqdm(range(3), desc="Converting GGUF tensors"))
    assert "GGUF" not in capsys.readouterr().err and gguf_utils.tqdm is bar
    with _gguf_bar(True):
        list(gguf_utils.tqdm(range(3), desc="Converting GGUF tensors"))
    assert "GGUF" in capsys.readouterr().err  # the loader's own bar, shown by default


def test_a_float_copy_loads_as_the_model_it_was_written_from(tmp_path):
    from qdiag.core.models import _keep_float_copy

    hf, tok = tiny_model("llama"), tiny_tokenizer()
    folder = tmp_path / "copy"
    _keep_float_copy(hf, tok, folder)
    assert "quantization_config" not in (folder / "config.json").read_text()
    back = unwrap(load_model(str(folder)))
    for (name, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left beside it


def test_a_failed_float_copy_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    from qdiag.core.models import _keep_float_copy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.warns(UserWarning, match="No space left"):
        _keep_float_copy(tiny_model("llama"), tiny_tokenizer(), tmp_path / "copy")
    assert list(tmp_path.iterdir()) == []


def test_the_float_copy_is_named_by_the_file_and_dtype(tmp_path, monkeypatch):
    import os

    from qdiag.core.models import float_copy

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("QDIAG_MODEL_CACHE", str(tmp_path / "cache"))
    first = float_copy(f, torch.float32)
    assert first.parent == tmp_path / "cache" and first == float_copy(f, torch.float32)
    assert float_copy(f, torch.bfloat16) != first
    os.utime(f, ns=(1, 1))  # the file replaced: another copy
    assert float_copy(f, torch.float32) != first
    monkeypatch.setenv("QDIAG_MODEL_CACHE", "off")
    assert float_copy(f, torch.float32) is None
