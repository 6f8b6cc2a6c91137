"""minquant.data: the published files, byte for byte, and reproducible calibration windows."""
import hashlib
import sys

import pytest
import torch

from minquant import data


@pytest.fixture
def shared_data():
    if data.data_dir() is None:
        pytest.fail("set MINQUANT_DATA to the data folder (CI uses ../shared/data)")
    return data.data_dir()


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_wikitext_rows_match_the_hf_dataset_card(shared_data):
    # Row counts and joined-text hashes published in data/README.md (the HF rows of wikitext-2-raw-v1).
    test, valid = data.load_rows("wikitext2", "test"), data.load_rows("wikitext2", "valid")
    assert (len(test), sum(bool(r) for r in test)) == (4358, 2891)
    assert (len(valid), sum(bool(r) for r in valid)) == (3760, 2461)
    assert sha(data.load_text("wikitext2", "test")) == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    assert sha(data.load_text("wikitext2", "test", sep="")) == "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
    assert sha(data.load_text("wikitext2", "validation")) == "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"


def test_c4_slice(shared_data):
    docs = data.load_rows("c4", "train")
    assert len(docs) == 1000 and all(isinstance(d, str) and d for d in docs)


def test_missing_file_names_the_variable_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINQUANT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"MINQUANT_DATA=.* the file wikitext-2-raw/wiki\.test\.raw"):
        data.load_text("wikitext2", "test")


def test_wrong_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-train.00000-of-01024.first1000.jsonl").write_text('{"text": "not C4"}\n')
    monkeypatch.setenv("MINQUANT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="not the published file"):
        data.load_rows("c4", "train")


def test_unset_variable_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.delenv("MINQUANT_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(RuntimeError, match="set MINQUANT_DATA .* or `pip install datasets`"):
        data.load_text("wikitext2", "test")


def test_unknown_names():
    with pytest.raises(ValueError, match="known: wikitext2/test, wikitext2/validation, c4/train"):
        data.load_rows("wikitext103", "test")
    with pytest.raises(ValueError, match="no data set 'wikitext2' split 'train'"):
        data.load_rows("wikitext2", "train")


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    return any(torch.equal(haystack[i:i + len(needle)], needle) for i in range(len(haystack) - len(needle) + 1))


def test_c4_windows_are_real_reproducible_slices(shared_data, minilm_tokenizer):
    w = data.calibration_windows("c4", minilm_tokenizer, n=6, seqlen=64, seed=0)
    assert w.shape == (6, 64) and w.dtype == torch.int64
    assert torch.equal(w, data.calibration_windows("c4", minilm_tokenizer, n=6, seqlen=64, seed=0))
    assert not torch.equal(w, data.calibration_windows("c4", minilm_tokenizer, n=6, seqlen=64, seed=1))
    docs = [minilm_tokenizer(d, return_tensors="pt").input_ids[0] for d in data.load_rows("c4", "train")]
    for window in w:  # each window is a contiguous run of one document's tokens
        assert any(len(d) > 64 and contains(d, window) for d in docs)
    long_only = data.calibration_windows("c4", minilm_tokenizer, n=4, seqlen=64, seed=0, min_doc_tokens=1500)
    for window in long_only:  # short windows, drawn from long documents only
        assert any(len(d) > 1500 and contains(d, window) for d in docs)
        assert not any(len(d) <= 1500 and contains(d, window) for d in docs)


def test_wikitext_windows(shared_data, minilm_tokenizer):
    w = data.calibration_windows("wikitext2", minilm_tokenizer, n=4, seqlen=32, seed=3)
    ids = minilm_tokenizer(data.load_text("wikitext2", "validation"), return_tensors="pt").input_ids[0]
    assert w.shape == (4, 32) and all(contains(ids, row) for row in w)
    with pytest.raises(ValueError, match="leak the evaluation text"):
        data.calibration_windows("wikitext2", minilm_tokenizer, n=1, seqlen=8, split="test")


def test_calibration_errors(shared_data, minilm_tokenizer):
    with pytest.raises(ValueError, match=r"no C4 document is longer than 1000000 tokens \(seqlen=1000000\)"):
        data.calibration_windows("c4", minilm_tokenizer, n=1, seqlen=1_000_000)
    with pytest.raises(ValueError, match="min_doc_tokens chooses among C4 documents; 'wikitext2' has none"):
        data.calibration_windows("wikitext2", minilm_tokenizer, n=1, seqlen=8, min_doc_tokens=100)
    with pytest.raises(ValueError, match="need n >= 1"):
        data.calibration_windows("c4", minilm_tokenizer, n=0)
    with pytest.raises(ValueError, match="known: c4, wikitext2"):
        data.calibration_windows("pile", minilm_tokenizer)
