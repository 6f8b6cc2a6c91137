"""`minquant bench paper`: the GPTQ paper's protocol runs end to end on random-init OPT, Llama and Qwen2 models."""
import json
import math

import pytest
import torch

from conftest import float64_ppl, save_tiny
from minquant.bench.paper import PAPER_ROWS, results_name
from minquant.bench.paper import run as bench_paper
from minquant.bench.paper import table as paper_table


def tiny_model(family: str, vocab: int):
    import transformers as T

    torch.manual_seed(0)
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256))
    kind = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    return kind[1](kind[0](vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def wikitext_ppl_float64(folder, seqlen: int, windows: int) -> float:
    """The saved float model's perplexity on the first WikiText-2 test windows, by the float64 reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minquant.data import load_text

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(load_text("wikitext2", "test"), return_tensors="pt").input_ids
    return float64_ppl(model, ids, seqlen, windows)[0]


def test_opt_125m_command_end_to_end(minilm_tokenizer, tmp_path, monkeypatch, capsys):
    """`minquant bench paper --model facebook/opt-125m`, with a random-init OPT standing in at that path."""
    from minquant.bench import results as bench_results
    from minquant.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_results, "RESULTS_DIR", tmp_path / "results")
    folder = save_tiny(tiny_model("opt", len(minilm_tokenizer)), minilm_tokenizer, tmp_path / "facebook" / "opt-125m")
    assert main(["bench", "paper", "--model", "facebook/opt-125m", "--max-windows", "2", "--seqlen", "64",
                 "--n-samples", "4", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "results" / "paper_facebook_opt_125m.json").read_text())
    results = record["results"]
    assert list(results) == ["fp32", "RTN W4", "GPTQ W4", "RTN W3", "GPTQ W3"]
    assert results["fp32"]["ppl"] == pytest.approx(wikitext_ppl_float64(folder, 64, 2), rel=1e-4)
    assert {k: v["paper"] for k, v in results.items()} == {"fp32": 27.65, "RTN W4": 37.28, "GPTQ W4": 31.12,
                                                           "RTN W3": None, "GPTQ W3": 53.85}
    assert all(math.isfinite(v["ppl"]) and v["ppl"] != results["fp32"]["ppl"] for k, v in results.items() if k != "fp32")
    assert record["protocol"]["calibration"] == {"source": "c4", "n_samples": 4, "seqlen": 64, "seed": 0}
    assert "| GPTQ W4 | " in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_recipe_for_other_families(family, minilm_tokenizer, tmp_path):
    folder = save_tiny(tiny_model(family, len(minilm_tokenizer)), minilm_tokenizer, tmp_path / family)
    path = bench_paper(str(folder), device="cpu", n_samples=2, seqlen=32, max_windows=1, out=tmp_path / "r.json",
                       progress=False)
    record = json.loads(path.read_text())
    assert record["protocol"]["reference"] == "none published"
    assert all(r["paper"] is None and math.isfinite(r["ppl"]) for r in record["results"].values())
    assert "| RTN W3 |" in paper_table(record) and str(folder) in paper_table(record)


def test_the_reference_row_and_names(monkeypatch, tmp_path):
    """Each published number lands beside the run it is for, in the record and in the table.

    The command runs here with model, data, quantization and evaluation stubbed out (seconds, no model):
    what is checked is how PAPER_ROWS is joined to the runs. A label in PAPER_ROWS that no run has (a typo,
    a renamed entry) would drop its number silently; that fails here. The numbers' own values are pinned
    against the paper in test_opt_125m_command_end_to_end.
    """
    class Evaluated:
        def __init__(self, ppl):
            self.ppl = ppl

    ppls = iter([20.0, 41.0, 32.0, 900.0, 64.0])  # distinct, so each table row can only be its own
    monkeypatch.setattr("minquant.load_model", lambda model: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr("minquant.api.calibration_data", lambda *a, **k: None)
    monkeypatch.setattr("minquant.quantize", lambda model, *a, **k: model)
    monkeypatch.setattr("minquant.evaluate", lambda *a, **k: Evaluated(next(ppls)))
    record = json.loads(bench_paper("facebook/opt-125m", device="cpu", seqlen=8, out=tmp_path / "r.json",
                                    progress=False).read_text())
    row, results = PAPER_ROWS["facebook/opt-125m"], record["results"]

    assert set(row) <= {"fp16", *results}  # every published number has its run
    assert results["fp32"]["paper"] == row["fp16"]  # on a CPU ours is fp32, beside the paper's fp16
    assert all(results[label]["paper"] == row.get(label) for label in results if label != "fp32")
    assert row["fp16"] < row["GPTQ W4"] < row["RTN W4"] and row["GPTQ W4"] < row["GPTQ W3"]  # the paper's shape
    shown = {"fp32": row["fp16"]} | {label: row.get(label, "-") for label in results if label != "fp32"}
    table = paper_table(record).splitlines()
    assert all(f"| {label} | {r['ppl']:.2f} | {shown[label]} |" in table for label, r in results.items())
    assert results_name("meta-llama/Llama-3.2-1B") == "paper_meta_llama_llama_3_2_1b"
