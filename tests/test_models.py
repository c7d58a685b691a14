import pytest

from qdiag.core.arch import resolve, unwrap
from qdiag.core.models import ModelNotFoundError, load_model, locate
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
