"""The `minquant` command: each subcommand end to end, its help, its errors, and the demo."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minquant.checkpoint import disk_bytes
from minquant.cli import main


def test_memory_llama2_70b(capsys):
    assert main(["memory", "meta-llama/Llama-2-70b-hf"]) == 0
    rows = {line.split()[0]: line.split()[1:5] for line in capsys.readouterr().out.splitlines()
            if line[:4] in ("fp32", "fp16", "int8", "int4")}
    # format: bits, weights GB, scale+zero GB, total GB
    assert rows["fp32"][:2] == ["32", "275.91"] and rows["fp16"][:2] == ["16", "137.95"]
    assert rows["int8"][1] == "68.98" and rows["int4"][1] == "34.49" and float(rows["int4"][2]) > 0


def test_memory_flags(capsys):
    assert main(["memory", "smollm2-135m", "--group-size", "64", "--linears-only", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "134,515,008 parameters" in out and "group size 64" in out and "context 8192" in out


def test_memory_unknown_model_is_a_clear_error(capsys):
    assert main(["memory", "llama70b"]) == 2
    assert "known packaged models are smollm2-135m, minilm-l6" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_through_the_installed_command(tmp_path):
    """`minquant demo` on the real SmolLM2, cut short (RTN only, one window): table, save, reload, generations."""
    exe = Path(sys.executable).parent / "minquant"
    run = subprocess.run([str(exe), "demo", "--methods", "rtn", "--eval-windows", "1", "--max-new-tokens", "8",
                          "--out", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "smollm2-135m: W4 g64" in out and "first 1 WikiText-2 test windows of 2048 tokens" in out
    rows = re.findall(r"^(fp32|RTN W4 g64) +[\d.]+ +[\d.]+ +([\d.]+) ", out, re.M)  # label, MB, MB, ppl
    assert [label for label, _ in rows] == ["fp32", "RTN W4 g64"] and float(rows[1][1]) > float(rows[0][1])
    assert "best: RTN W4 g64, saved to" in out
    float_text = out.split("\nfp32: ")[1].splitlines()[0]
    quant_text = out.split("\nRTN W4 g64 (reloaded): ")[1].splitlines()[0]
    assert len(float_text.split()) >= 3 and len(quant_text.split()) >= 3  # real generations, not empty strings
    record = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert record["generations"]["fp32"] == float_text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_kernels_without_gpu_says_why(capsys):
    assert main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "matmul8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_quantize_eval_generate_on_a_folder(tiny_llama_folder, tmp_path, capsys):
    """The shell front door: quantize a local folder, then eval and generate from the checkpoint."""
    import minquant

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_folder), "--method", "awq", "--group-size", "32", "--n-samples", "4",
                 "--seqlen", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AWQ W4 g32: quantized in" in printed
    assert (out / "awq_search.safetensors").is_file()  # the search, beside the weights
    weights = (out / "model.safetensors").stat().st_size  # the only weight file: a tiny model is one shard
    assert disk_bytes(out) == weights and f"({weights / 1e6:.1f} MB of weights)" in printed

    assert main(["eval", str(out), "--max-windows", "2", "--seqlen", "64"]) == 0
    printed = capsys.readouterr().out
    expected = minquant.evaluate(minquant.load(out), "wikitext2", seqlen=64, max_windows=2, progress=False)
    assert f"perplexity {expected.ppl:.3f} on wikitext2/test" in printed and "2 windows of 64 tokens" in printed

    assert main(["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("prompt: hello world\n") and "tokens in" in printed


def test_every_subcommand_has_help_with_examples(capsys):
    for command in ("quantize", "eval", "generate", "memory", "bench", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example" in capsys.readouterr().out


def test_eval_of_a_missing_folder_is_one_line(capsys):
    assert main(["eval", "./no/such/model"]) == 2
    assert "minquant eval: error: no model folder at './no/such/model'" in capsys.readouterr().err


def test_quantize_smoothquant_static_and_nvfp4_on_a_folder(tiny_llama_folder, tmp_path, capsys):
    """Notebook 11's methods from the shell: compressed-tensors checkpoints, eval reads them back."""
    import json

    out = tmp_path / "sq"
    assert main(["quantize", str(tiny_llama_folder), "--method", "smoothquant", "--activations", "static",
                 "--n-samples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    assert "SmoothQuant W8A8 int8, static activations: quantized in" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "int-quantized")
    assert main(["eval", str(out), "--max-windows", "1", "--seqlen", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_folder), "--method", "nvfp4", "--out", str(tmp_path / "fp4")]) == 0
    assert "NVFP4 weights: quantized in" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_folder), "--method", "nvfp4", "--alpha", "0.5", "--out", str(tmp_path / "x")]) != 0
