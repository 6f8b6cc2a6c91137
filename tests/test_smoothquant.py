"""SmoothQuant: the scales' formula, the fold leaves the float function unchanged, outliers stop hurting static W8A8."""
import copy

import pytest
import torch

from minquant.smoothquant import search_alpha, smoothing_scales, w8a8_output_error, w8a8_quantize_model
from minquant.w8a8 import W8A8Config, W8A8Linear


def with_outliers(model, channels=(3, 17), factor=60.0):
    """The tiny Llama with a few hidden channels ~60x larger at every block's norms, as real LLMs have them."""
    for block in model.model.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.data[list(channels)] *= factor
    return model


def test_smoothing_scales_formula_and_dead_channels():
    x_max = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w_max = torch.tensor([1.0, 2.0, 0.25, 0.0])
    s = smoothing_scales(x_max, w_max, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 6.0, 1.0]))  # sqrt(4/1), dead, sqrt(9/0.25), dead
    torch.testing.assert_close(smoothing_scales(x_max, w_max, 1.0)[[0, 2]], x_max[[0, 2]])


def test_alpha_search_beats_no_smoothing_on_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, [5, 40]] *= 80  # outlier channels in every token
    w = torch.randn(48, 64) * 0.05
    cfg = W8A8Config(activations="static", smoothquant=True)
    s, alpha, errors = search_alpha(x, x.abs().amax(0), [w], cfg)
    assert alpha > 0 and errors[alpha] < errors[0.0] / 5
    assert errors[alpha] == pytest.approx(w8a8_output_error(x, w, s, cfg, x.abs().amax(0)))


def test_smoothing_alone_preserves_the_float_function(tiny_llama):
    # with 8-bit rounding taken out, a smoothed and folded model computes what the float one does
    from minquant.awq import fold_scale

    model = with_outliers(tiny_llama)
    ids = torch.randint(0, 64, (2, 16))
    ref = model(ids).logits
    block = model.model.layers[0]
    s = smoothing_scales(torch.rand(64) * 10 + 0.1, torch.rand(64) + 0.1, 0.5)
    fold_scale(block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj], s)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_smoothquant_rescues_static_int8(tiny_llama):
    model = with_outliers(tiny_llama)
    torch.manual_seed(1)
    calib, ids = torch.randint(0, 64, (8, 32)), torch.randint(0, 64, (4, 32))
    ref = model(ids).logits.double()
    err = {}
    for smooth in (False, True):
        m = copy.deepcopy(model)
        report = w8a8_quantize_model(m, calib, W8A8Config(activations="static", smoothquant=smooth), progress=False)
        assert sum(isinstance(x, W8A8Linear) and x.input_scale is not None for x in m.modules()) == 14
        err[smooth] = float((m(ids).logits.double() - ref).pow(2).mean())
    assert len(report["alphas"]) == 6  # q/k/v and gate/up after the norms, down_proj after up_proj; GQA skips o_proj
    assert err[True] < err[False] / 2


def test_dynamic_needs_no_data_and_static_does(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    w8a8_quantize_model(m, None, W8A8Config(), progress=False)
    assert sum(isinstance(x, W8A8Linear) for x in m.modules()) == 14
    with pytest.raises(ValueError, match="give calibration windows"):
        w8a8_quantize_model(copy.deepcopy(tiny_llama), None, W8A8Config(activations="static"))
    with pytest.raises(ValueError, match="already quantized"):
        w8a8_quantize_model(m, None, W8A8Config())


def test_failure_part_way_puts_every_block_back(tiny_llama):
    model = with_outliers(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # block 1's MLP input goes to zero: its static activation scale cannot be set, after block 0 was converted
    model.model.layers[1].post_attention_layernorm.weight.data.zero_()
    zeroed = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.gate_proj: every calibration input is zero"):
        w8a8_quantize_model(model, torch.randint(0, 64, (4, 16)), W8A8Config(activations="static", smoothquant=True),
                            progress=False)
    assert not any(isinstance(x, W8A8Linear) for x in model.modules())
    after = model.state_dict()
    assert after.keys() == zeroed.keys() and all(torch.equal(after[k], zeroed[k]) for k in after)
    assert not torch.equal(before["model.layers.0.input_layernorm.weight"], torch.zeros(64))


def test_nan_activations_are_named(tiny_llama):
    model = tiny_llama
    model.model.layers[0].mlp.up_proj.weight.data[0] = float("inf")  # inf * 0 in SiLU(gate) * up: NaN downstream
    model.model.layers[0].mlp.up_proj.weight.data[0] = 0
    model.model.layers[1].input_layernorm.weight.data[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        w8a8_quantize_model(model, torch.randint(0, 64, (2, 8)), W8A8Config(smoothquant=True), progress=False)
    assert not any(isinstance(x, W8A8Linear) for x in model.modules())


def test_a_family_whose_norms_cannot_absorb_scales_is_refused():
    import transformers as T

    cfg = T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                      do_layer_norm_before=False, word_embed_proj_dim=32)
    model = T.OPTForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        w8a8_quantize_model(model, torch.randint(0, 64, (2, 8)), W8A8Config(smoothquant=True))
