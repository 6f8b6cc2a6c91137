"""A third-party loader reads our GPTQ checkpoints: transformers + optimum + GPTQModel.

They run in their own environment (`make test VERIFY_LOADERS=1`, as CI does, builds it and sets
MINQUANT_GPTQMODEL_PYTHON), loading our folder with the plain `AutoModelForCausalLM.from_pretrained`.
GPTQModel's "torch" backend dequantizes exactly; its default CPU kernel (TorchAtenLinear) converts
zero-points to bf16 offsets and differs by about 1% of the logits on SmolLM2.
"""
import os
import subprocess

import pytest
import torch
import transformers as T

from minquant.checkpoint import load_quantized, save_quantized
from minquant.quant import QuantConfig
from minquant.rtn import quantize_to_quantlinear

PYTHON = os.environ.get("MINQUANT_GPTQMODEL_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="needs MINQUANT_GPTQMODEL_PYTHON: run `make test VERIFY_LOADERS=1`")

LOAD_WITH_TRANSFORMERS = """
import sys, torch, transformers
ids = torch.load(sys.argv[2])
qc = transformers.GPTQConfig(bits=int(sys.argv[4]), backend="torch")
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float32,
                                                          quantization_config=qc)
kinds = {f"{type(m).__module__.split('.')[0]}.{type(m).__name__}" for m in model.modules()}
with torch.no_grad():
    torch.save({"logits": model(ids).logits.float(), "kinds": sorted(kinds)}, sys.argv[3])
"""


def third_party_logits(folder, ids, bits, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([PYTHON, "-c", LOAD_WITH_TRANSFORMERS, str(folder), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt"), str(bits)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def tiny_llama_model():
    """A seeded 2-block Llama (hidden 128, grouped-query attention, lm_head separate)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return T.LlamaForCausalLM(config).eval()


def ours(folder, ids):
    model, _ = load_quantized(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32), QuantConfig(3, 32), QuantConfig(8, -1, symmetric=True),
                                 QuantConfig(2, 64)])
def test_tiny_llama(cfg, tmp_path):
    model = tiny_llama_model()
    quantize_to_quantlinear(model, cfg)
    save_quantized(model, None, tmp_path / "ckpt")
    ids = torch.arange(24).reshape(2, 12)
    theirs = third_party_logits(tmp_path / "ckpt", ids, cfg.bits, tmp_path)
    assert "gptqmodel.TorchLinear" in theirs["kinds"], theirs["kinds"]  # GPTQModel's own layers read the files
    torch.testing.assert_close(theirs["logits"], ours(tmp_path / "ckpt", ids), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_smollm2_int4_g64(smollm2, tmp_path):
    import copy

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    quantize_to_quantlinear(model, QuantConfig(4, 64))
    save_quantized(model, tokenizer, tmp_path / "ckpt")
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    theirs, mine = third_party_logits(tmp_path / "ckpt", ids, 4, tmp_path)["logits"], ours(tmp_path / "ckpt", ids)
    torch.testing.assert_close(theirs, mine, rtol=2e-3, atol=5e-2)  # logits reach ~30; fp16 weights in their kernel
    # the same next token wherever ours leads by more than the two may differ (two such gaps): a closer call
    # is a near-tie that another kernel, or another CPU's rounding, may break the other way
    top2 = mine.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * (5e-2 + 2e-3 * top2[..., 0].abs())
    assert clear.float().mean() > 0.5, "too few clear calls to compare"
    assert torch.equal(theirs.argmax(-1)[clear], mine.argmax(-1)[clear])


@pytest.mark.parametrize("act_order", [False, True])
def test_tiny_llama_gptq(act_order, tmp_path):
    """A GPTQ checkpoint, with act-order's permuted g_idx and desc_act=true, reads the same elsewhere."""
    import minquant

    model = tiny_llama_model()
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    minquant.quantize(model, "gptq", bits=4, group_size=32, act_order=act_order, calib=calib, progress=False)
    save_quantized(model, None, tmp_path / "ckpt")
    ids = torch.arange(24).reshape(2, 12)
    theirs = third_party_logits(tmp_path / "ckpt", ids, 4, tmp_path)
    assert "gptqmodel.TorchLinear" in theirs["kinds"], theirs["kinds"]
    torch.testing.assert_close(theirs["logits"], ours(tmp_path / "ckpt", ids), rtol=1e-3, atol=1e-3)


LOAD_WITH_GPTQMODEL = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH).model   # its own loader: reads `dynamic`
g, out = torch.Generator().manual_seed(0), {}
for name, m in model.named_modules():
    if type(m).__name__ in ("TorchLinear", "Linear") and ".layers." in name:
        x = torch.randn(4, m.in_features, generator=g).to(torch.bfloat16)   # it computes in bf16 on CPU
        with torch.no_grad():
            out[name] = (type(m).__name__, x, m(x).float())
torch.save(out, sys.argv[2])
"""


def test_tiny_llama_mixed_precision(minilm_tokenizer, tmp_path):
    """Per-layer bits and group sizes, and layers left float, reach GPTQModel's own loader through `dynamic`."""
    from minquant.gptq import GPTQConfig, gptq_quantize_model
    from minquant.nn import QuantLinear

    model = tiny_llama_model()
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    # symmetric: GPTQModel's loader takes asymmetric GPTQ v1 files only from its own recent versions
    plan = {f"model.layers.0.self_attn.{x}_proj": QuantConfig(8, 32, symmetric=True) for x in "qkv"}
    plan |= {"model.layers.1.mlp.down_proj": QuantConfig(2, 64, symmetric=True), "model.layers.0.mlp.gate_proj": None,
             "model.layers.0.mlp.up_proj": None, "model.layers.1.self_attn.o_proj": QuantConfig(3, -1, symmetric=True)}
    gptq_quantize_model(model, calib, GPTQConfig(QuantConfig(4, 32, symmetric=True)), plan=plan, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 12
    save_quantized(model, minilm_tokenizer, tmp_path / "ckpt")  # GPTQModel's loader wants a tokenizer
    run = subprocess.run([PYTHON, "-c", LOAD_WITH_GPTQMODEL, str(tmp_path / "ckpt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    mine, _ = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    assert len(theirs) == 14
    for name, (kind, x, y) in theirs.items():
        layer = mine.get_submodule(name)
        assert kind == ("Linear" if type(layer) is torch.nn.Linear else "TorchLinear"), name
        with torch.no_grad():
            ref = layer(x.float())
        # bf16 arithmetic there: ~0.4% of the largest output; a wrong bit width or group size is off by far more
        assert (y - ref).abs().max() <= 1e-2 * ref.abs().max(), name
