"""compressed-tensors checkpoints: the tensors and config block the format names, a round trip that gives the
same logits, and a folder from elsewhere checked tensor by tensor. (A third-party reader: test_third_party.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minquant
from minquant.compressed import compressed_config

SCHEMES = {"w8a8": ({}, "int-quantized", {"weight": torch.int8}),
           "smoothquant": ({"activations": "static"}, "int-quantized", {"weight": torch.int8, "input_scale": None}),
           "fp8": ({}, "float-quantized", {"weight": torch.float8_e4m3fn}),
           "nvfp4": ({}, "nvfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                                                  "weight_global_scale": torch.float32}),
           "mxfp4": ({}, "mxfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.uint8})}


def quantized(model, method):
    options = dict(SCHEMES[method][0])
    if method == "smoothquant":
        options["calib"] = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    return minquant.quantize(model, method, progress=False, **options)


@pytest.mark.parametrize("method", list(SCHEMES))
def test_round_trip_and_the_format(tiny_llama, tmp_path, method):
    model = quantized(tiny_llama, method)
    ids = torch.randint(0, 64, (2, 12))
    minquant.save(model, tmp_path / "ckpt", dtype=torch.float32)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", SCHEMES[method][1], "compressed")
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    for name, dtype in SCHEMES[method][2].items():
        assert dtype is None or tensors[prefix + name].dtype == dtype, name
    assert prefix + "weight_zero_point" not in tensors and "lm_head.weight" not in tensors  # symmetric; tied head
    back = minquant.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    minquant.save(back, tmp_path / "again", dtype=torch.float32)  # a loaded model saves the same block again
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in again.items() if k != "minquant_method"} == {k: v for k, v in qc.items() if k != "minquant_method"}


def test_static_input_scale_and_weight_scale_shapes(tiny_llama, tmp_path):
    model = quantized(tiny_llama, "smoothquant")
    minquant.save(model, tmp_path / "ckpt")  # fp16 by default: scales in the model dtype, as llm-compressor stores them
    t = load_file(tmp_path / "ckpt" / "model.safetensors")
    q = model.model.layers[0].self_attn.q_proj
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert t["model.layers.0.self_attn.q_proj.input_scale"].shape == (1,)
    assert t["model.layers.0.self_attn.q_proj.input_scale"].dtype == torch.float16
    assert float(t["model.layers.0.self_attn.q_proj.input_scale"]) == pytest.approx(float(q.input_scale), rel=1e-3)


def test_one_scheme_per_checkpoint(tiny_llama):
    from minquant.microscaling import FP4Linear

    model = quantized(tiny_llama, "w8a8")
    layer = model.model.layers[1].mlp.down_proj
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    model.model.layers[1].mlp.down_proj = FP4Linear.from_linear(linear, "nvfp4")
    with pytest.raises(ValueError, match="mixes 2 schemes"):
        compressed_config(model)


def test_a_tampered_folder_is_refused_by_name(tiny_llama, tmp_path):
    model = quantized(tiny_llama, "fp8")
    minquant.save(model, tmp_path / "ckpt", dtype=torch.float32)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].float()  # fp8 as fp32
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"up_proj\.weight is torch\.float32, expected torch\.float8_e4m3fn"):
        minquant.load(tmp_path / "ckpt")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        minquant.load(tmp_path / "ckpt")


def test_schemes_minquant_does_not_compute_are_named(tiny_llama, tmp_path):
    model = quantized(tiny_llama, "nvfp4")
    minquant.save(model, tmp_path / "ckpt", dtype=torch.float32)
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 4, "type": "float"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="W4A4"):
        minquant.load(tmp_path / "ckpt")
    config["quantization_config"]["format"] = "marlin-24"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 'marlin-24'"):
        minquant.load(tmp_path / "ckpt")
