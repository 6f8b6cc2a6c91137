"""minquant.bench: results files carry their provenance, the README quotes them verbatim, and each table reads its file."""
import json

import pytest
import torch

from minquant.bench import registry, results


def test_results_roundtrip_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    path = results.save_results("demo", {"seqlen": 8}, {"ppl": 1.5})
    record = results.load_results("demo")
    assert path == tmp_path / "demo.json" and record["results"] == {"ppl": 1.5}
    assert {"command", "date", "machine", "versions", "protocol"} <= set(record)
    assert record["versions"]["torch"] == torch.__version__ and record["machine"]["cores"] >= 1
    with pytest.raises(FileNotFoundError, match="no results file .*missing.json"):
        results.load_results("missing")
    for argv0 in ("/venv/bin/minquant", "/src/minquant/__main__.py", "/src/minquant/cli.py"):  # one command
        monkeypatch.setattr("sys.argv", [argv0, "bench", "sass"])
        assert json.loads(results.save_results("demo", {}, {}).read_text())["command"] == "minquant bench sass"
    monkeypatch.setattr("sys.argv", ["out/run.py", "--x"])
    assert json.loads(results.save_results("demo", {}, {}).read_text())["command"] == "out/run.py --x"


def test_readme_tables_are_the_results_files():
    import re

    readme = results.README.read_text()
    for name in registry.results_names():
        block = f"<!-- results:{name} -->\n{registry.table(name)}\n<!-- /results:{name} -->"
        assert block in readme, f"README is stale or lacks the table of {name}: run `minquant bench readme`"
    for name in re.findall(r"<!-- results:(\S+) -->", readme):  # and no table without its file
        assert name in registry.results_names(), f"README has a table for {name} but no results file"


def test_every_results_file_has_a_benchmark():
    import fnmatch

    names = registry.results_names()
    by_hand = ("gpu_checks_*",)  # recorded by hand on a lent GPU (data/results/README.md): no benchmark, no table
    files = [p.stem for p in results.RESULTS_DIR.glob("*.json") if not any(fnmatch.fnmatch(p.stem, h) for h in by_hand)]
    assert sorted(names) == sorted(files)
    for name in ("rtn_smollm2", "claims", "sass_kernels", "cpu_intel-xeon"):
        assert name in names
    with pytest.raises(KeyError, match="no benchmark writes"):
        registry.table_for("nothing_like_this")
    with pytest.raises(ValueError, match="minquant bench packing takes no --only"):
        registry.run("packing", only=["x"])


def test_update_readme_rewrites_only_the_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    results.save_results("r", {}, {"x": 1})
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:r -->\nold\n<!-- /results:r -->\nend\n<!-- results:gone -->\nkept\n<!-- /results:gone -->\n")
    results.update_readme(["r", "gone"], lambda name: (lambda record: f"x is {record['results']['x']}"), readme)
    assert readme.read_text() == ("intro\n<!-- results:r -->\nx is 1\n<!-- /results:r -->\nend\n"
                                  "<!-- results:gone -->\nkept\n<!-- /results:gone -->\n")


def test_kernels_table_reads_the_sweep():
    from minquant.bench.kernels import table as kernels_table
    from minquant.bench.kernels import targets_reached

    row = lambda M, fp16, mq, int4: {"M": M, "K": 8192, "N": 8192, "speedup_vs_fp16": fp16 / mq,  # noqa: E731
                                     "speedup_vs_torch_int4": int4 / mq, "percent_of_copy_bandwidth": 50.0,
                                     "ms": {"fp16_matmul": fp16, "minquant_w4a16": mq, "torch_int4": int4}}
    rows = [row(1, 0.056, 0.014, 0.021), row(16, 0.056, 0.028, 0.08), row(2, 1, 1, 1)]
    record = {"machine": {"gpu": "GPU X"}, "command": "minquant bench kernels", "date": "2026-11-27T00:00",
              "versions": {"torch": "2.11"}, "protocol": {"group_size": 128, "triton": "3.6", "rotation_bytes": 2**29,
                                                          "copy_bandwidth_gbs": 3000.0, "targets": "t"},
              "results": {"sweep": rows, "decode": {}}}
    table = kernels_table(record)
    assert "| 8192 x 8192 | 1 | 56.0 | 14.0 | 4.00x | 50% | 21.0 | 1.50x |" in table
    assert "| 8192 x 8192 | 2 |" not in table  # only the batches asked for
    rows[0]["act_order_slowdown"] = 1.08
    t = targets_reached(rows, {"graphed_speedup": 2.6})
    assert t["M1_speedup_vs_fp16"] == {"value": 4.0, "target": 3.0, "met": True}
    assert t["M1_speedup_vs_torch_int4"]["met"] and not t["M1_percent_of_copy_bandwidth"]["met"]  # 50% < 75%
    assert t["M16_speedup_vs_fp16"] == {"value": 2.0, "target": 2.0, "met": True}
    assert not t["M1_act_order_time_ratio"]["met"] and t["decode_graphed_speedup"]["met"]  # 8% slower > 5%
    assert "M128_speedup_vs_fp16" not in t  # not measured: not claimed


def test_mixed_and_calibration_sweeps_and_tables():
    from minquant.bench import calibration
    from minquant.bench.mixed import PROTOCOL, W3_G64, W4_G64, entries
    from minquant.bench.mixed import table as mixed_table

    specs = dict(entries())
    assert len(specs) == len(entries())
    budgets = sorted(s["bits_budget"] for s in specs.values() if "bits_budget" in s)
    assert W3_G64 in budgets and W4_G64 in budgets and W3_G64 == 3 + 19 / 64
    record = {"protocol": PROTOCOL, "machine": {"cpu": "X", "cores": 2}, "results": {
        "mixed 3.297 bpw (= W3 g64)": {**specs["mixed 3.297 bpw (= W3 g64)"], "ppl": 40.0, "quantize_seconds": 300.4,
                                       "bits_per_weight": 3.29, "plan_counts": {"W3 g64": 100, "W4 g32": 110},
                                       "measured": "2026-01-05 00:00 UTC"}}}
    gptq = {"results": {"fp32": {"ppl": 20.0}, "GPTQ W3 g64 asym": {"bits": 3, "group_size": 64, "ppl": 56.0, "quantize_seconds": 169.0},
                        "GPTQ W3 g64 asym act-order static": {"bits": 3, "group_size": 64, "ppl": 43.0, "quantize_seconds": 176.0},
                        "GPTQ W3 g64 asym act-order": {"bits": 3, "group_size": 64, "ppl": 48.0, "quantize_seconds": 178.0}}}
    awq = {"results": {"AWQ W3 g64 asym": {"bits": 3, "group_size": 64, "ppl": 42.5, "quantize_seconds": 298.0},
                       "AWQ W3 g64 asym no-clip": {"bits": 3, "group_size": 64, "ppl": 51.0, "quantize_seconds": 313.0}}}
    table = mixed_table(record, gptq, awq)
    assert "| 3.290 | mixed 3.297 bpw (= W3 g64) | 40.00 | 300 | W3 g64: 100, W4 g32: 110 |" in table
    assert "| 3.297 | GPTQ W3 g64 asym | 56.00 | 169 |  |" in table and '"fp32" rows): 20.00' in table
    # the strongest uniform baselines at the same bytes are in the table, the variants that are not are not
    assert "| 3.297 | GPTQ W3 g64 asym act-order static | 43.00 | 176 |  |" in table
    assert "| 3.297 | AWQ W3 g64 asym | 42.50 | 298 |  |" in table and "no-clip" not in table and "act-order |" not in table
    calib = dict(calibration.entries())
    assert calib["GPTQ random 128x512 seed 2"]["calib"] == {"source": "random", "n_samples": 128, "seqlen": 512, "seed": 2}
    assert calib["AWQ c4 long-documents 32x128 seed 1"]["calib"]["min_doc_tokens"] == 2048 and len(calib) == 73
    assert calib["GPTQ act-order static c4 8x512 seed 0"]["act_order"] and not calib["GPTQ c4 8x512 seed 0"].get("act_order")  # plain: the sweep runs GPTQ entries with act_order off unless named
    assert calibration.PROTOCOL["eval"]["windows"] == 4
    rec = {"protocol": calibration.PROTOCOL, "machine": {"cpu": "X", "cores": 2}, "results": {
        "GPTQ c4 8x512 seed 0": {"ppl": 50.0}, "GPTQ c4 8x512 seed 1": {"ppl": 54.0}, "RTN (no calibration)": {"ppl": 70.0}}}
    t = calibration.table(rec)
    assert "| GPTQ c4 8x512 | 52.00 | 50.00 - 54.00 | 2 |" in t and "| RTN (no calibration) | 70.00 | 70.00 - 70.00 | 1 |" in t


def test_rtn_results_support_the_claims():
    rows = {r["label"]: r for r in results.load_results("rtn_smollm2")["results"]["smollm2"]}
    assert abs(rows["W8 per-channel"]["ppl"] / rows["fp32"]["ppl"] - 1) < 0.005
    assert rows["W4 g64"]["ppl"] < rows["W4 per-channel"]["ppl"]
    assert rows["W4 g32 float zero"]["ppl"] == pytest.approx(rows["fp32"]["ppl"], rel=1e-3)  # the Q4_1 file
    assert all(r["rtn_seconds"] < 5 for r in rows.values())


def test_wikitext_sentences():
    from minquant.bench.rtn import wikitext_sentences

    sentences = wikitext_sentences(256)
    assert len(sentences) == 256 and len(set(sentences)) > 250
    assert all(len(s.split()) >= 6 and not s.startswith("=") for s in sentences)


def test_sentence_embeddings_are_unit_vectors(minilm_tokenizer):
    from minquant.bench.rtn import sentence_embeddings
    from minquant.models import load_model

    model, tok = load_model("minilm-l6")
    e = sentence_embeddings(model, tok, ["one short sentence .", "and a somewhat longer second sentence ."])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


def test_packing_results_support_the_claims():
    record = results.load_results("packing_smollm2")["results"]
    assert record["layer_4096"]["ratio_to_fp16"] <= 0.27
    for row in record["smollm2"]:  # files agree with minquant.memory's accounting within 1%
        assert row["file_bytes"] == pytest.approx(row["analytic_bytes"], rel=0.01), row


def test_gptq_sweep_labels_and_table():
    from minquant.bench.gptq import PROTOCOL, SCHEMES, entries
    from minquant.bench.gptq import table as gptq_table

    labels = [label for label, _ in entries()]
    n_asym = sum(not sym for _, _, sym in SCHEMES)  # HQQ has asymmetric entries only
    assert len(labels) == len(set(labels)) == 1 + 6 * len(SCHEMES) + n_asym + 3 * len(SCHEMES) + 3 * (len(SCHEMES) - n_asym)
    assert all(spec["group_size"] in (-1, 64) for _, spec in entries()[1:])  # 576 inputs: no g128
    record = {"protocol": PROTOCOL, "machine": {"cpu": "X", "cores": 2}, "results": {
        "fp32": {"ppl": 20.0, "quantize_seconds": 0.0, "measured": "2026-01-01 00:00 UTC", "peak_rss_bytes": 1e9},
        "GPTQ W3 g64 asym act-order": {"ppl": 40.123, "quantize_seconds": 99.6, "measured": "2026-01-02 00:00 UTC",
                                       "peak_rss_bytes": 3e9}}}
    table = gptq_table(record)
    assert "| W3 g64 asym | — | — | 40.12 (100 s) | — | — | — | — |" in table
    assert "| W3 g64 sym | — | — | — | — | — | — | n/a |" in table
    assert "fp32: 20.00" in table and "last entry 2026-01-02" in table and "ours 3.0-3.0 GB" in table
    assert "llm-compressor not measured yet" in table
    record["results"]["GPTQ W4 per-channel sym full-range"] = {"ppl": 33.333, "quantize_seconds": 150.2,
                                                              "measured": "2026-01-02 00:00 UTC"}
    table = gptq_table(record)
    assert "| W4 per-channel sym | — | 33.33 (150 s) | — | — | — | — |" in table
    assert "| W4 per-channel asym | n/a | n/a | n/a | — | — | — |" in table
    specs = dict(entries())
    assert specs["GPTQ W4 per-channel sym full-range"]["full_range"] and specs["RTN W3 g64 sym full-range"]["method"] == "rtn"
    assert specs["GPTQ W4 g64 asym range-search act-order static"]["search_range"]
    assert specs["GPTQ W3 g64 sym not-true-sequential"]["true_sequential"] is False


def test_awq_sweep_labels_and_table():
    from minquant.bench.awq import PROTOCOL, entries
    from minquant.bench.awq import table as awq_table
    from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL

    specs = dict(entries())
    assert len(specs) == len(entries()) == 8 and all(s["group_size"] == 64 and not s["sym"] for s in specs.values())
    assert specs["llm-compressor AWQ W3 g64 asym"]["peer_method"] == "awq" and not specs["AWQ W4 g64 asym no-clip"]["clip"]
    assert PROTOCOL["calibration"] == GPTQ_PROTOCOL["calibration"] and PROTOCOL["eval"] == GPTQ_PROTOCOL["eval"]
    record = {"protocol": PROTOCOL, "machine": {"cpu": "X", "cores": 2}, "results": {
        "AWQ W4 g64 asym": {"ppl": 25.555, "quantize_seconds": 80.4, "peak_rss_bytes": 2e9, "measured": "2026-01-03 00:00 UTC"}}}
    gptq = {"results": {"fp32": {"ppl": 20.0, "quantize_seconds": 0.0}, "RTN W4 g64 asym": {"ppl": 27.0, "quantize_seconds": 1.0}}}
    table = awq_table(record, gptq)
    assert "| W4 g64 asym | 27.00 (1 s) | — | — | 25.55 (80 s) | — | — | — |" in table
    assert "| W3 g64 asym | — | — | — | — | — | — | — |" in table
    assert "fp32: 20.00" in table and "ours 2.0-2.0 GB" in table and "llm-compressor not measured yet" in table
    assert "on X (2 cores), last entry 2026-01-03" in table
    assert "fp32" not in awq_table(record, {"results": {}})  # without the GPTQ sweep's numbers


def test_peak_memory_sees_an_allocation():
    import os

    from minquant.meter import PeakMemory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with PeakMemory() as mem:
        big = torch.ones(256 * 2**20 // 4)  # 256 MB, touched
        held = rss()
        del big
    # the moment the tensor was alive is in the peak, though it is freed by now (1 MB: the kernel's RSS
    # counters are per CPU and only approximately summed, so statm and VmHWM differ by a few pages)
    assert mem.bytes >= held - 2**20
    with PeakMemory(reset=False) as lifetime:
        pass
    assert lifetime.bytes >= mem.bytes  # the process's peak since it started


def test_eightbit_table():
    from minquant.bench import eightbit

    labels = list(eightbit.formats())
    record = {"machine": {"cpu": "X", "cores": 2},
              "protocol": {"formats": "f", "smollm2": {"eval": "e"}, "minilm": {"sentences": 256}},
              "results": {"smollm2": {"fp32": 20.0, **{k: 20.2 for k in labels}}, "minilm": {k: 0.99 for k in labels}}}
    table = eightbit.table(record)
    assert "| fp8 e4m3 per-channel | 20.20 | +1.00% | 0.99000 |" in table and table.count("\n| ") == len(labels) + 1



def test_claims_come_from_the_results_files():
    record = results.load_results("claims")
    rows = {r["claim"]: r for r in record["results"]["rows"]}
    rtn = {r["label"]: r["ppl"] for r in results.load_results("rtn_smollm2")["results"]["smollm2"]}
    eight = rows["naive 8-bit weights cost < 1% quality"]
    assert f"{rtn['W8 per-channel']:.2f} vs fp32 {rtn['fp32']:.2f}" in eight["measured"] and eight["verdict"].startswith("holds")
    assert f"RTN W4 g64 {100 * (rtn['W4 g64'] / rtn['fp32'] - 1):+.0f}%" in rows["naive 4-bit weights cost 2-5% quality"]["measured"]
    assert len(rows) == 4


def test_mixed_results_meet_the_targets():
    from minquant.bench.mixed import W3_G64, W4_G64

    mixed = results.load_results("mixed_smollm2")["results"]
    gptq = results.load_results("gptq_smollm2")["results"]
    w3, w4 = mixed["mixed 3.297 bpw (= W3 g64)"], mixed["mixed 4.312 bpw (= W4 g64)"]
    assert w3["bits_per_weight"] <= W3_G64 and w4["bits_per_weight"] <= W4_G64  # never over the budget
    assert w3["ppl"] < gptq["GPTQ W3 g64 asym"]["ppl"]  # beats uniform at equal bytes
    assert w4["ppl"] <= gptq["GPTQ W4 g64 asym"]["ppl"]
    assert len(w3["plan"]) == 210 and sum(w3["plan_counts"].values()) == 210


def test_sensitivity_table_ranks_layers():
    from minquant.bench import sensitivity

    measured = {"a": 0.3, "b": 0.1, "c": 0.2}
    record = {"protocol": {"quantized": "RTN W3 g64 asym", "measured_on": "x", "stats": "y"},
              "results": {"base_nll": 3.0, "measured_seconds": 60.0, "stats_seconds": 5.0, "measured": measured,
                          "proxies": {"p": {"a": 1.0, "b": 3.0, "c": 2.0}}, "spearman": {"p": -0.5},
                          "sum_measured": 0.6, "sum_proxy": {"p": 6.0}}}
    text = sensitivity.table(record, top=2)
    assert "| p | -0.500 | 6 |" in text
    assert "| a | 0.3000 | 3 |" in text and "| c | 0.2000 | 2 |" in text and "| b |" not in text
