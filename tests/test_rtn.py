"""minquant.rtn on whole models: which layers, in place, with a per-layer report."""
import pytest
import torch

from minquant.quant import QuantConfig, fake_quantize
from minquant.rtn import quantizable_linears, fake_quantize_model


def test_quantizes_every_block_linear_and_nothing_else(tiny_llama):
    model = tiny_llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = fake_quantize_model(model, QuantConfig(4, 32))
    names = [r.name for r in report]
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down, per block
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in names:
            torch.testing.assert_close(p, fake_quantize(before[name], QuantConfig(4, 32)), rtol=0, atol=0)
        else:  # embeddings (tied lm_head too) and norms are untouched
            assert torch.equal(p, before[name]), name
    assert all(r.sqnr_db > 10 and r.mse > 0 for r in report)


def test_skip_patterns(tiny_llama):
    model = tiny_llama
    report = fake_quantize_model(model, QuantConfig(4, 32), skip=("lm_head", "*.mlp.*"))
    assert {r.name.split(".")[-1] for r in report} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(quantizable_linears(model, skip=())) >= {"lm_head"}


def test_bad_group_size_names_the_layer_and_changes_nothing(tiny_llama):
    model = tiny_llama
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: group_size 48 does not divide the 128"):
        fake_quantize_model(model, QuantConfig(4, 48), skip=("lm_head", "*attn*", "*gate*", "*up*"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_weights_are_refused(tiny_llama):
    model = tiny_llama
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj: weight has NaN/Inf"):
        fake_quantize_model(model, QuantConfig(4, 32))


@pytest.mark.slow
def test_smollm2_w8_per_channel_is_nearly_lossless(smollm2):
    import copy

    model = copy.deepcopy(smollm2[0])  # the session's model stays unquantized
    report = fake_quantize_model(model, QuantConfig(8, -1))  # its time is measured by `minquant bench rtn`
    assert len(report) == 210 and min(r.sqnr_db for r in report) > 35
