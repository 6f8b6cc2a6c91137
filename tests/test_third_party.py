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


def test_streamed_sharded_checkpoint(tmp_path):
    """A streamed GPTQ checkpoint in several shards with model.safetensors.index.json (minquant/stream.py) loads
    with plain from_pretrained, as a single-file one does: transformers follows the index."""
    import json

    import minquant

    tiny_llama_model().save_pretrained(tmp_path / "float", max_shard_size="100KB")
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    out = minquant.quantize(str(tmp_path / "float"), "gptq", bits=4, group_size=32, calib=calib, progress=False,
                            out_dir=tmp_path / "ckpt", max_shard_size="100KB")
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    ids = torch.arange(24).reshape(2, 12)
    theirs = third_party_logits(out, ids, 4, tmp_path)
    assert "gptqmodel.TorchLinear" in theirs["kinds"], theirs["kinds"]
    torch.testing.assert_close(theirs["logits"], ours(out, ids), rtol=1e-3, atol=1e-3)


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


# ---------------------------------------------------------------------------------------------
# compressed-tensors checkpoints (W8A8 int8 / FP8, NVFP4, MXFP4): transformers + the compressed-tensors package
# ---------------------------------------------------------------------------------------------

LOAD_COMPRESSED = """
import sys, torch, transformers
ids, dtype = torch.load(sys.argv[2]), getattr(torch, sys.argv[4])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
q_proj = model.model.layers[0].self_attn.q_proj
with torch.no_grad():
    logits = model(ids).logits.float()       # each linear fake-quantizes its input as the config says
    schemes = sum(hasattr(m, "quantization_scheme") for m in model.modules())
    layers, g = {}, torch.Generator().manual_seed(0)  # each quantized linear on inputs of its own (3-D: per token)
    for name, m in model.named_modules():
        if hasattr(m, "quantization_scheme"):
            scale = float(m.input_scale) * 60 if hasattr(m, "input_scale") else 1.0  # static: some beyond its range
            x = (torch.randn(1, 4, m.in_features, generator=g) * scale).to(dtype)
            layers[name] = (x, m(x).float())
    for m in model.modules():                # the same model with activation quantization off: weights only
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    weights_only = model(ids).logits.float()
torch.save({"logits": logits, "weights_only": weights_only, "schemes": schemes, "q_proj": q_proj.weight.float(),
            "layers": layers}, sys.argv[3])
"""


def compressed_logits(folder, ids, dtype, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([PYTHON, "-c", LOAD_COMPRESSED, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                          str(dtype).removeprefix("torch.")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def weights_only(model, dtype):
    """Our model with every quantized layer replaced by a float linear of its dequantized weight."""
    import copy

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if hasattr(m, "dequantize_weight") and not isinstance(m, torch.nn.Linear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            linear.weight.data = m.dequantize_weight(dtype)
            model.set_submodule(name, linear)
    return model


class CompressedTensorsInt8:
    """compressed-tensors' own dynamic int8 activations (scale max|x| / 127.5 on -128..127, where ours and vLLM's
    runtime use / 127 on -127..127): what its reader computes, written out to check it reads our weights exactly."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        s = (x.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(x.dtype).eps)
        return torch.nn.functional.linear(torch.round(torch.clamp(x / s, -128, 127)) * s, self.layer.dequantize_weight())


@pytest.mark.parametrize("method, options, dtype", [
    ("w8a8", {}, torch.float32), ("smoothquant", {"activations": "static"}, torch.float32), ("fp8", {}, torch.float32),
    # the reader decompresses fp4 weights to bf16 whatever the model dtype: compare in bf16
    ("nvfp4", {}, torch.bfloat16), ("mxfp4", {}, torch.bfloat16)])
def test_tiny_llama_compressed_tensors(method, options, dtype, tmp_path):
    """Read by transformers + compressed-tensors: the same weights bit for bit, every layer computing what ours does."""
    import minquant

    model = tiny_llama_model()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    minquant.quantize(model, method, progress=False, **options, **({"calib": calib} if method == "smoothquant" else {}))
    minquant.save(model, tmp_path / "ckpt", dtype=dtype)
    theirs = compressed_logits(tmp_path / "ckpt", ids, dtype, tmp_path)
    assert theirs["schemes"] == 14  # every block linear read as quantized; lm_head left float
    mine = minquant.load(tmp_path / "ckpt", dtype=dtype)
    torch.testing.assert_close(theirs["q_proj"], mine.model.layers[0].self_attn.q_proj.dequantize_weight().to(dtype).float(),
                               rtol=0, atol=0)  # the weights, bit for bit
    # float32: only summation order differs; bf16: the same bf16 operations on both sides
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(theirs["weights_only"], weights_only(mine, dtype)(ids).logits.float(), **tol)
        check_layers(theirs["layers"], mine, method, tol)
        if method != "w8a8":  # fp8 per token, static int8 with our stored scale, weight-only fp4: computed alike
            torch.testing.assert_close(theirs["logits"], mine(ids).logits.float(), **tol)


def check_layers(layers: dict, mine, method: str, tol: dict) -> None:
    """Each of their quantized linears against ours on the same input; dynamic int8 against their convention, written out."""
    assert layers
    for name, (x, y) in layers.items():
        layer = mine.get_submodule(name)
        expected = CompressedTensorsInt8(layer)(x) if method == "w8a8" else layer(x)
        torch.testing.assert_close(y, expected.float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_smollm2_smoothquant_compressed_tensors(smollm2, tmp_path, activations):
    """The real model: every layer reads and computes as ours; the whole model's logits agree as far as 30 blocks of
    8-bit rounding let two float implementations agree (one input a ulp apart that rounds the other way moves
    everything after it by a step, and SmolLM2's down_proj steps are large), so that part is checked loosely."""
    import copy

    import minquant
    from minquant.data import calibration_windows

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        float_logits = model(ids).logits
    calib = calibration_windows("c4", tokenizer, n=8, seqlen=256, seed=0)
    minquant.quantize(model, "smoothquant", activations=activations, calib=calib, progress=False)
    minquant.save(model, tmp_path / "ckpt", dtype=torch.float32)
    theirs = compressed_logits(tmp_path / "ckpt", ids, torch.float32, tmp_path)
    assert theirs["schemes"] == 210
    with torch.no_grad():
        check_layers(theirs["layers"], model, "smoothquant" if activations == "static" else "w8a8", dict(rtol=1e-4, atol=1e-4))
        mine = model(ids).logits.float()
    ours_error, their_error = (mine - float_logits).norm(), (theirs["logits"] - float_logits).norm()
    if activations == "static":  # one quantizer: apart by less than either is from float
        assert (theirs["logits"] - mine).norm() < 0.5 * ours_error
    else:  # two conventions for the per-token scale (/127.5 there, /127 here): equally far from float
        assert abs(their_error - ours_error) < 0.1 * ours_error
    assert torch.equal(theirs["logits"].argmax(-1), mine.argmax(-1))
