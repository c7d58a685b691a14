import warnings
from collections import Counter

import pytest
import torch

from qdiag.core import data


@pytest.mark.parametrize("template,ok", [
    ("The capital of [X] is [Y] .", True),
    ("[X] is located in [Y].", True),
    ("[Y] is the capital of [X].", False),
    ("[X] and [Y] share a border with each other.", False),
])
def test_usable_templates(template, ok):
    assert data.usable(template) is ok


def test_prompt_stops_before_the_object():
    assert data.prompt_of("The capital of [X] is [Y] .", "France") == "The capital of France is"


def test_pararel_from_the_shared_copy(data_dir):
    facts = data.load_pararel(data_dir)
    assert len({f.relation for f in facts}) >= 30
    assert all(f.templates and all(data.usable(t) for t in f.templates) for f in facts)
    capital = [f for f in facts if f.relation == "P36"]
    assert capital and all(p.endswith(" is") or not p.endswith(" ") for p in capital[0].prompts())


def test_repeated_and_ambiguous_subjects(tmp_path):
    import json

    for sub in ("patterns", "facts"):
        (tmp_path / "pararel" / sub).mkdir(parents=True)
    (tmp_path / "pararel" / "patterns" / "P1.jsonl").write_text(json.dumps({"pattern": "[X] is in [Y]."}))
    lines = [("Paris", "France"), ("Paris", "France"), ("Georgia", "Asia"), ("Georgia", "America"), ("Rome", "Italy")]
    (tmp_path / "pararel" / "facts" / "P1.jsonl").write_text(
        "\n".join(json.dumps({"sub_label": s, "obj_label": o}) for s, o in lines))
    facts = data.load_pararel(tmp_path)
    assert [(f.subject, f.obj) for f in facts] == [("Paris", "France"), ("Rome", "Italy")]


def test_fact_ids_are_unique_in_the_shared_copy(data_dir):
    ids = [f.id for f in data.load_pararel(data_dir)]
    assert len(ids) == len(set(ids))


def test_pararel_from_qdiag_data_variable(data_dir, monkeypatch):
    monkeypatch.setenv("QDIAG_DATA", str(data_dir))
    assert {f.relation for f in data.load_pararel(relations=["P36"])} == {"P36"}


def test_download_once_into_the_cache(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("QDIAG_DATA", raising=False)
    monkeypatch.setenv("QDIAG_CACHE", str(tmp_path))
    # a file:// mirror laid out like the upstream repository stands in for the network
    mirror = tmp_path / "mirror"
    for sub, remote in (("patterns", "pattern_data/graphs_json"), ("facts", "trex_lms_vocab")):
        (mirror / remote).mkdir(parents=True)
        for f in (data_dir / "pararel" / sub).glob("P*.jsonl"):
            (mirror / remote / f.name).write_bytes(f.read_bytes())
    facts = data.load_pararel(base_url=mirror.as_uri())
    assert (tmp_path / "pararel" / "patterns" / "P36.jsonl").exists()
    assert not list((tmp_path / "pararel").rglob("*.tmp"))
    assert len(facts) == len(data.load_pararel(data_dir))


def test_probe_set_when_nothing_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("QDIAG_DATA", raising=False)
    monkeypatch.setenv("QDIAG_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="probe set"):
        facts = data.load_pararel(base_url=(tmp_path / "nowhere").as_uri())
    assert len(facts) >= 200 and len({f.relation for f in facts}) >= 4
    assert all(len(f.templates) >= 4 for f in facts)
    with pytest.warns(UserWarning, match="probe set"):
        data.load_pararel(download=False)


def test_missing_data_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_pararel(tmp_path / "absent")


def test_sampling_is_seeded_and_balanced(data_dir):
    facts = data.load_pararel(data_dir)
    a = data.sample_facts(facts, 120, seed=3)
    assert a == data.sample_facts(facts, 120, seed=3)
    assert a != data.sample_facts(facts, 120, seed=4)
    per_relation = Counter(f.relation for f in a)
    assert max(per_relation.values()) - min(per_relation.values()) <= 1
    with pytest.raises(ValueError, match="at least 1"):
        data.sample_facts(facts, 0)
    with pytest.raises(ValueError, match="no facts"):
        data.sample_facts([], 5)


def test_text_and_calibration(data_dir, tokenizer):
    text = data.load_text("valid", data_dir)
    assert text.startswith(" \n = ")
    ids = data.calibration_tokens(tokenizer, n_samples=3, seq_len=16, seed=1, root=data_dir)
    assert ids.shape == (3, 16)
    assert torch.equal(ids, data.calibration_tokens(tokenizer, 3, 16, seed=1, root=data_dir))
    with pytest.raises(ValueError, match="empty"):
        data.text_tokens(tokenizer, "   ")
    with pytest.raises(ValueError, match="split"):
        data.load_text("train", data_dir)


def test_probe_text_when_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("QDIAG_DATA", raising=False)
    monkeypatch.setenv("QDIAG_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = data.load_text("test", base_url=(tmp_path / "nowhere").as_uri())
    assert "Paris" in text


def test_calibration_windows_start_with_bos_where_the_tokenizer_adds_one(data_dir):
    from qdiag.testing import tiny_tokenizer

    plain = data.calibration_tokens(tiny_tokenizer(), 3, 16, seed=0, root=data_dir)
    led = data.calibration_tokens(tiny_tokenizer(bos=True), 3, 16, seed=0, root=data_dir)
    assert plain.shape == led.shape == (3, 16)
    assert (led[:, 0] == 2).all() and (plain[:, 0] != 2).all()
    assert torch.equal(led[:, 1:], plain[:, :15])  # the same text, after the BOS
