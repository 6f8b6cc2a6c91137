"""minquant.quantize and `minquant quantize`: arguments checked once, checkpoints that reload."""
import json

import pytest
import torch

import minquant
from minquant.checkpoint import load_quantized, save_quantized
from minquant.nn import QuantLinear


def ids(n=8, seqlen=16, seed=0):
    return torch.randint(0, 64, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_round_trip(tiny_llama, tmp_path, act_order):
    model = minquant.quantize(tiny_llama, "gptq", bits=4, group_size=32, act_order=act_order, static_groups=False,
                              calib=ids(), progress=False)
    assert model is tiny_llama and sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert set(model.quantization_report["layers"]) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    save_quantized(model, None, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["minquant_method"], qc["desc_act"], qc["bits"], qc["group_size"]) == ("gptq", "gptq", act_order, 4, 32)
    loaded, _ = load_quantized(tmp_path, dtype=torch.float32)
    g = "model.layers.1.mlp.down_proj.g_idx"
    assert torch.equal(loaded.state_dict()[g], model.state_dict()[g])
    assert act_order != torch.equal(model.state_dict()[g].long(), torch.arange(128) // 32)
    x = ids(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-3, atol=1e-3)


def test_gptq_defaults_to_act_order_on_static_groups(tiny_llama):
    """The front door's GPTQ is the best measured (act-order, static groups); act_order=False is the plain sweep."""
    import copy

    from minquant.api import method_config
    from minquant.gptq import GPTQConfig
    from minquant.quant import QuantConfig

    assert method_config("gptq", bits=4, group_size=32) == GPTQConfig(QuantConfig(4, 32), act_order=True, static_groups=True)
    assert method_config("gptq", act_order=False) == GPTQConfig(QuantConfig(4, 128))
    plain = minquant.quantize(copy.deepcopy(tiny_llama), "gptq", bits=4, group_size=32, act_order=False, calib=ids(),
                              progress=False)
    model = minquant.quantize(tiny_llama, "gptq", bits=4, group_size=32, calib=ids(), progress=False)
    qc = model.config.quantization_config
    assert (qc["desc_act"], qc["static_groups"]) == (True, True)
    assert plain.config.quantization_config["desc_act"] is False
    g = "model.layers.1.mlp.down_proj"
    assert torch.equal(model.state_dict()[g + ".g_idx"].long(), torch.arange(128) // 32)  # static: groups in order
    assert not torch.equal(model.state_dict()[g + ".qweight"], plain.state_dict()[g + ".qweight"])


def test_awq_checkpoint_round_trip_and_search_reapplied(tiny_llama, tmp_path):
    import copy

    from minquant.awq import AWQSearch, apply_awq

    fresh = copy.deepcopy(tiny_llama)
    model = minquant.quantize(tiny_llama, "awq", bits=4, group_size=32, calib=ids(), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14 and model.awq_search.alphas
    save_quantized(model, None, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["minquant_method"], qc["desc_act"]) == ("gptq", "awq", False)
    loaded, _ = load_quantized(tmp_path, dtype=torch.float32)
    again = apply_awq(fresh, AWQSearch.load(model.awq_search.save(tmp_path / "awq_search.safetensors")))
    x = ids(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-3, atol=1e-3)  # fp16 checkpoint
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


def test_gptq_without_true_sequential(tiny_llama):
    model = minquant.quantize(tiny_llama, "gptq", bits=4, group_size=32, true_sequential=False, calib=ids(), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert model.config.quantization_config["true_sequential"] is False


def test_rtn_through_the_same_front_door(tiny_llama):
    minquant.quantize(tiny_llama, "rtn", bits=8, group_size=-1, sym=True, progress=False)
    assert tiny_llama.config.quantization_config["minquant_method"] == "rtn"
    assert all(m.cfg.bits == 8 for m in tiny_llama.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="awq2"), "unknown method 'awq2'; minquant has: rtn, gptq, awq"),
    (dict(method="awq", act_order=True, calib=ids()), "act_order=True: not option\\(s\\) of method='awq'"),
    (dict(method="rtn", clip=False), "clip=False: not option"),
    (dict(method="awq", calib=torch.zeros(0, 16, dtype=torch.long)), "non-empty"),
    (dict(method="awq", bits=9), "bits must be"),
    (dict(bits=9), "bits must be an integer from 2 to 8"),
    (dict(bits=1), "bits must be an integer from 2 to 8"),
    (dict(calib="c4"), "needs the model's tokenizer"),
    (dict(calib=torch.zeros(0, 16, dtype=torch.long)), "non-empty \\(n, seqlen\\) integer tensor"),
    (dict(calib=torch.randn(4, 16)), "integer tensor"),
    (dict(n_samples=0, calib="c4", tokenizer=object()), "n_samples must be at least 1"),
    (dict(group_size=48, calib=ids()), "group_size 48 does not divide the 64"),
    (dict(method="rtn", search_range=True), "search_range=True: not option"),
    (dict(method="rtn", true_sequential=False), "true_sequential=False: not option"),
    (dict(method="awq", true_sequential=False, calib=ids()), "true_sequential=False: not option"),
    (dict(full_range=True), "full_range is a variant of symmetric"),
])
def test_bad_arguments_are_named(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        minquant.quantize(tiny_llama, **{"method": "gptq", "group_size": 32, "progress": False, **kwargs})
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())


def test_calibration_text_shorter_than_one_window(tiny_llama, minilm_tokenizer):
    tiny_llama.config.max_position_embeddings = 10**8  # else the window is refused first, as too long for it
    with pytest.raises(ValueError, match="fewer than seqlen=10000000"):
        minquant.quantize(tiny_llama, "gptq", tokenizer=minilm_tokenizer, calib="wikitext2", seqlen=10_000_000,
                          group_size=32, progress=False)


def test_already_quantized_model_is_refused(tiny_llama):
    minquant.quantize(tiny_llama, "rtn", group_size=32, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        minquant.quantize(tiny_llama, "gptq", group_size=32, calib=ids(), progress=False)


@pytest.mark.slow
def test_cli_quantize_gptq_on_the_real_model(tmp_path, capsys):
    from minquant.cli import main

    out = tmp_path / "smollm2-gptq"
    assert main(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "--act-order",
                 "--n-samples", "2", "--seqlen", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPTQ W4 g64 act-order: quantized in" in printed and "MB of weights" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["minquant_method"] == "gptq"
    model, tokenizer = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 210  # 7 linears x 30 blocks


def test_cli_quantize_error_is_one_line(tmp_path, capsys):
    from minquant.cli import main

    assert main(["quantize", "smollm2-135m", "--group-size", "128", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: block 0 self_attn.q_proj: group_size 128 does not divide the 576" in err


def test_gptq_on_opt_and_on_a_bert_encoder():
    """The architecture table's other families: a random OPT decoder and the real MiniLM encoder."""
    import transformers as T

    from minquant.models import load_model

    torch.manual_seed(0)
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                       num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)).eval()
    x = ids(2, 12, seed=3)
    with torch.no_grad():
        before = opt(x).logits
    minquant.quantize(opt, "gptq", bits=8, group_size=32, calib=ids(), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in opt.modules()) == 12
    with torch.no_grad():
        torch.testing.assert_close(opt(x).logits, before, rtol=0.05, atol=0.05)  # 8 bits: nearly lossless

    minilm, tok = load_model("minilm-l6")
    batch = tok(["GPTQ rounds weights with the data in mind.", "A sentence encoder."], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = minilm(**batch).last_hidden_state
    calib = tok(" ".join(["the quick brown fox jumps over the lazy dog"] * 20), return_tensors="pt").input_ids[:, :64]
    minquant.quantize(minilm, "gptq", bits=4, group_size=32, calib=calib.repeat(4, 1), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in minilm.modules()) == 6 * 6  # the pooler is not in a block
    with torch.no_grad():
        after = minilm(**batch).last_hidden_state
    assert torch.nn.functional.cosine_similarity(after.mean(1), before.mean(1)).min() > 0.9


def test_front_door_by_name_save_load_evaluate(tiny_llama_folder, tmp_path):
    """quantize(name) -> save -> load gives the same logits and the same perplexity, with the tokenizer carried."""
    model = minquant.quantize(str(tiny_llama_folder), "rtn", bits=4, group_size=32, progress=False)
    assert model.tokenizer is not None
    out = minquant.save(model, tmp_path / "q", dtype=torch.float32)
    loaded = minquant.load(out)
    assert loaded.tokenizer.vocab == model.tokenizer.vocab and next(loaded.parameters()).dtype == torch.float32
    x = ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    a = minquant.evaluate(model, text, seqlen=32, progress=False)
    b = minquant.evaluate(loaded, text, seqlen=32, progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5) and a.windows == b.windows > 1


def test_front_door_errors_are_clear(tiny_llama):
    with pytest.raises(TypeError, match="expected a model .* or a model name, got int"):
        minquant.quantize(123, "rtn")
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        minquant.evaluate(tiny_llama, "some text")
    with pytest.raises(ValueError, match="no QuantLinear layers: quantize it first"):
        minquant.save(tiny_llama, "/tmp/never-written")


def test_memory_is_a_callable_module(tiny_llama):
    from minquant.memory import MemoryReport, weight_bytes

    r = minquant.memory(tiny_llama.config, group_size=32)
    assert isinstance(r, MemoryReport) and r.measured is None and minquant.memory.weight_bytes is weight_bytes
    assert r.params == sum(p.numel() for p in tiny_llama.parameters())  # tied embedding counted once
    assert r.formats["int4"] == weight_bytes(tiny_llama.config, "int4", 32)
    assert "int4" in str(r) and "KV cache" in str(r)
    rotary = sum(b.numel() * b.element_size() for b in tiny_llama.buffers())  # inv_freq
    assert minquant.memory(tiny_llama, group_size=32).measured == sum(p.numel() * 4 for p in tiny_llama.parameters()) + rotary
    minquant.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    measured = sum(t.numel() * t.element_size() for t in [*tiny_llama.parameters(), *tiny_llama.buffers()]
                   if t.data_ptr() != tiny_llama.lm_head.weight.data_ptr() or t is tiny_llama.lm_head.weight)
    assert minquant.memory(tiny_llama, group_size=32).measured == measured
    with pytest.raises(TypeError, match="expected a model name, a transformers config or a model, got int"):
        minquant.memory(7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_front_door_on_a_gpu(tmp_path):
    """Each method quantizes block by block on the GPU; the checkpoint loads onto it (fp16, the Triton
    kernel) and scores what the fp32 model scores on the CPU; it generates; the CUDA peak is measured."""
    import copy

    import transformers as T

    from minquant.compare import PeakMemory

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 512, (8, 64))
    text = torch.randint(0, 512, (1, 512))
    for method in ("rtn", "gptq", "awq"):
        q = minquant.quantize(copy.deepcopy(model), method, group_size=64, calib=calib, device="cuda", progress=False)
        cpu_ppl = minquant.evaluate(q, text, seqlen=128, progress=False).ppl
        out = minquant.save(q, tmp_path / method)
        with PeakMemory("cuda") as peak:
            on_gpu = minquant.load(out, device="cuda")
        assert peak.bytes > 0 and all(t.is_cuda for t in on_gpu.buffers())
        assert next(on_gpu.parameters()).dtype == torch.float16
        assert minquant.evaluate(on_gpu, text, seqlen=128, progress=False).ppl == pytest.approx(cpu_ppl, rel=1e-2)
        with torch.no_grad():
            assert on_gpu.generate(text[:, :8].cuda(), max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_each_method_is_configured_by_its_own_config():
    from minquant.api import method_config
    from minquant.awq import AWQConfig
    from minquant.gptq import GPTQConfig
    from minquant.quant import QuantConfig

    grid = QuantConfig(3, 64, symmetric=True, full_range=True)
    assert method_config("rtn", bits=3, group_size=64, sym=True, full_range=True) == grid
    assert method_config("gptq", bits=3, group_size=64, sym=True, full_range=True, act_order=True) == \
        GPTQConfig(grid, act_order=True, static_groups=True)
    assert method_config("gptq", bits=3, group_size=64, sym=True, full_range=True, act_order=False) == GPTQConfig(grid)
    assert method_config("awq", bits=3, group_size=64, sym=True, full_range=True, clip=False) == AWQConfig(grid, clip=False)
    with pytest.raises(ValueError, match=r"damp=0.1: not option\(s\) of method='awq' \(its options: clip, clip_grid"):
        method_config("awq", damp=0.1)
    with pytest.raises(ValueError, match="static_groups is a variant of act_order"):
        method_config("gptq", act_order=False, static_groups=True)


# ---------------------------------------------------------------------------------------------
# Beyond weight-only (notebook 11): W8A8 int8 / SmoothQuant / FP8 and the fp4 formats through the front door
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, options, layer", [
    ("w8a8", {}, "W8A8Linear"), ("fp8", {}, "W8A8Linear"), ("mxfp4", {}, "FP4Linear"), ("nvfp4", {}, "FP4Linear"),
    ("smoothquant", {"activations": "static"}, "W8A8Linear")])
def test_quantize_beyond_weight_only(tiny_llama, method, options, layer):
    import minquant

    ids = torch.randint(0, 64, (4, 16))
    if method == "smoothquant":
        options = {**options, "calib": ids}
    ref = tiny_llama(ids).logits
    model = minquant.quantize(tiny_llama, method, progress=False, **options)
    assert sum(type(m).__name__ == layer for m in model.modules()) == 14
    assert type(model.lm_head) is torch.nn.Linear  # the head stays float, as in every tool
    assert model.quantization_report["method"] == method
    assert float((model(ids).logits - ref).norm() / ref.norm()) < (0.2 if "fp4" in method else 0.05)


def test_beyond_weight_only_options_are_checked(tiny_llama):
    import minquant

    ids = torch.randint(0, 64, (4, 16))
    cases = [(dict(method="w8a8", bits=3), "bits=3: not option"), (dict(method="w8a8", calib=ids), "need no calibration"),
             (dict(method="nvfp4", alpha=0.5), "it has no options"), (dict(method="smoothquant", damp=0.1), "activations, alpha"),
             (dict(method="w8a8", alpha=0.3), "needs smoothquant=True"), (dict(method="fp8", group_size=64), "grid is fixed"),
             (dict(method="mxfp4", calib=ids), "no calibration data"), (dict(method="int4"), "unknown method")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            minquant.quantize(tiny_llama, progress=False, **kwargs)
    assert not any(hasattr(m, "weight_scale") for m in tiny_llama.modules())
    q = minquant.quantize(tiny_llama, "w8a8", bits=8, progress=False)  # bits=8 says what w8a8 is anyway
    with pytest.raises(ValueError, match="already quantized \\(it has W8A8Linear layers\\)"):
        minquant.quantize(q, "gptq", calib=ids)
