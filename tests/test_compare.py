"""minquant.compare: the end-to-end comparison and the demo, on a tiny random Llama with a real tokenizer."""
import copy
import mmap
import os

import pytest
import torch
from torch import nn

import minquant
from conftest import float64_ppl
from minquant.compare import PeakMemory, compare, demo, layer_errors, layer_outputs
from minquant.nn import QuantLinear


def quant_linear_bytes(K: int, N: int, bits: int, group_size: int) -> int:
    """The GPTQ layout by its definition: qweight, qzeros (bits each), fp16 scales, int32 g_idx."""
    G = K // group_size
    return K * N * bits // 8 + G * N * bits // 8 + G * N * 2 + K * 4


@pytest.fixture(scope="module")
def tiny(tiny_llama_folder):
    model, _ = minquant.load_model(str(tiny_llama_folder))
    return model


def test_compare_measures_bytes_ppl_and_errors(tiny):
    from minquant.data import load_text
    from minquant.eval import eval_ids

    entries, best = compare(tiny, methods=("rtn", "gptq", "awq"), bits=4, group_size=32, n_samples=4, seqlen=64,
                            eval_windows=2, eval_seqlen=128, error_tokens=64, progress=False)
    assert [e.method for e in entries] == ["fp32", "rtn", "gptq", "awq"]
    ids = eval_ids(load_text("wikitext2", "test"), tiny.tokenizer)[:, :256]
    assert entries[0].ppl == pytest.approx(float64_ppl(tiny, ids, 128, 2)[0], rel=1e-4)
    linears = [m for m in tiny.model.layers.modules() if isinstance(m, nn.Linear)]
    assert entries[0].linear_bytes == sum(m.weight.numel() * 4 for m in linears)
    for e in entries[1:]:
        assert e.linear_bytes == sum(quant_linear_bytes(m.in_features, m.out_features, 4, 32) for m in linears)
        assert e.model_bytes == entries[0].model_bytes - entries[0].linear_bytes + e.linear_bytes
        assert set(e.errors) == {f"model.layers.{i}.{n}" for i in range(2) for n in
                                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        assert all(0 < v < 1 for v in e.errors.values()) and e.seconds > 0 and e.peak_bytes > 0
    assert min(entries[1:], key=lambda e: e.ppl).ppl == pytest.approx(float64_ppl(best, ids, 128, 2)[0], rel=1e-3)
    assert any(isinstance(m, QuantLinear) for m in best.modules())
    assert not any(isinstance(m, QuantLinear) for m in tiny.modules())  # the float model is left as it was


def test_layer_errors_zero_for_the_same_model_and_shrink_with_bits(tiny):
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    reference = layer_outputs(tiny, ids)
    assert all(v == 0 for v in layer_errors(reference, copy.deepcopy(tiny), ids).values())
    errors = {}
    for bits in (2, 8):
        q = minquant.quantize(copy.deepcopy(tiny), "rtn", bits=bits, group_size=32, progress=False)
        errors[bits] = layer_errors(reference, q, ids)
    assert all(errors[8][k] < errors[2][k] / 20 for k in errors[2])  # ~6 dB per bit: 6 bits >> 20x


def touch_fresh_pages(n_bytes: int) -> None:
    """Take n_bytes of new pages from the OS, write each, give them back.

    An anonymous mmap of its own, not a tensor: malloc may serve a tensor from heap memory that is
    already resident (left free by earlier tests), which raises no RSS peak at all.
    """
    buf = mmap.mmap(-1, n_bytes)
    for i in range(0, n_bytes, mmap.PAGESIZE):
        buf[i] = 1
    buf.close()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_peak_memory_sees_a_temporary_allocation_and_not_an_earlier_one():
    touch_fresh_pages(800_000_000)  # a higher peak before the block: the reset must forget it
    with PeakMemory() as peak:
        touch_fresh_pages(400_000_000)  # freed before the block ends
    above_now = peak.bytes - rss_bytes()
    assert 0.9 * 400e6 <= above_now < 600e6, above_now


def test_peak_memory_says_none_where_the_peak_cannot_be_reset(monkeypatch):
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("clear_refs"):
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with PeakMemory() as peak:
        pass
    assert peak.bytes is None  # not the process's lifetime peak


def test_compare_refuses_unknown_methods_and_models_without_a_tokenizer(tiny, tiny_llama):
    with pytest.raises(ValueError, match="methods must be some of rtn, gptq, awq"):
        compare(tiny, methods=("hqq",))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        compare(tiny_llama)


def test_demo_end_to_end(tiny_llama_folder, tmp_path, capsys):
    record = demo(str(tiny_llama_folder), tmp_path / "best", methods=("rtn", "awq"), group_size=32, n_samples=4,
                  seqlen=64, eval_windows=1, eval_seqlen=128, max_new_tokens=6, progress=False)
    printed = capsys.readouterr().out
    assert "RTN W4 g32" in printed and "AWQ W4 g32" in printed and f"best: {record['best']}" in printed
    assert record["reload_max_logit_change"] < 0.05  # fp16 norms and embeddings on disk, nothing else
    reloaded = minquant.load(tmp_path / "best")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
    assert list(record["generations"]) == ["fp32", f"{record['best']} (reloaded)"]
    assert all(f"{label}: {text}" in printed for label, text in record["generations"].items())


def test_awq_errors_undo_the_folded_scales(tiny):
    """AWQ with no rounding to speak of (8 bits): every linear's output, the scaled ones included, matches the float model's."""
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    reference = layer_outputs(tiny, ids)
    q = minquant.quantize(copy.deepcopy(tiny), "awq", bits=8, group_size=32, calib=torch.randint(0, 1000, (4, 32)),
                          progress=False)
    assert any(n.endswith(("v_proj", "up_proj")) for n in q.awq_search.scales)  # some outputs were scaled
    errors = layer_errors(reference, q, ids)
    assert max(errors.values()) < 0.02
