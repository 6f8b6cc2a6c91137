import copy
from dataclasses import replace

import pytest
import torch

from minquant.awq import AWQConfig, AWQSearch, apply_awq, awq_quantize_model, fold_scale, output_error, quantize_shrunk, search_clip, search_scale
from minquant.calibrate import InputStats
from minquant.nn import QuantLinear
from minquant.quant import QuantConfig


def windows(n=12, seqlen=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama_mha():
    """A 2-block Llama without grouped-query attention (so v_proj -> o_proj folds), random norms."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # not all ones: a fold into the norm must really change it
    return model


def stats_of(X: torch.Tensor) -> InputStats:
    """InputStats from explicit inputs X (n, K), in float64 then float32, as an independent reference."""
    Xd = X.double()
    return InputStats((2 * Xd.T @ Xd / len(X)).float(), Xd.abs().mean(0).float(), len(X))


def correlated_inputs(n=512, K=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g))
    X[:, :3] *= 12  # a few salient channels, as LLM activations have
    return X


def test_output_error_is_the_summed_squared_output_error():
    X = correlated_inputs()
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    W_q = quantize_shrunk(W, QuantConfig(3, 16))[3]
    direct = float(((W.double() - W_q.double()) @ X.double().T).pow(2).sum())
    assert output_error(W, W_q, stats_of(X).H) == pytest.approx(direct * 2 / len(X), rel=1e-4)


def test_quantize_shrunk_with_no_shrink_is_rtn():
    from minquant.quant import storable_qparams
    from minquant.quant import quantize

    W = torch.randn(32, 64)
    cfg = QuantConfig(4, 16)
    q, scale, zero, _ = quantize_shrunk(W, cfg)
    s_ref, z_ref = storable_qparams(W, cfg)
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref) and torch.equal(q, quantize(W, s_ref, z_ref, cfg))


def test_scale_search_is_the_argmin_over_alpha_and_beats_rtn():
    X = correlated_inputs()
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(48, 64, generator=g), torch.randn(32, 64, generator=g)]
    cfg = AWQConfig(QuantConfig(3, 16))
    s, alpha, errors = search_scale(weights, stats_of(X), cfg)
    W = torch.cat(weights)

    def err64(s):  # float64, from X itself: || (W - Q(W s)/s) X ||^2 * 2/n
        W_q = quantize_shrunk(W * s, cfg.quant)[3] / s
        return float(((W.double() - W_q.double()) @ X.double().T).pow(2).sum()) * 2 / len(X)

    assert len(errors) == 20 and errors[0] == pytest.approx(err64(torch.ones(64)), rel=1e-4)  # alpha = 0 is RTN
    assert min(errors) == pytest.approx(err64(s), rel=1e-4) and errors.index(min(errors)) == cfg.alphas.index(alpha)
    assert err64(s) < 0.8 * err64(torch.ones(64))  # the salient channels make scaling pay
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)
    assert s[:3].min() > s[3:].max()  # the salient channels are the ones scaled up


def test_clip_search_picks_each_groups_best_shrink():
    X = correlated_inputs(seed=3)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    W[0, 5] = 8.0  # an outlier weight: its group is better clipped
    cfg = AWQConfig(QuantConfig(3, 16))
    shrink = search_clip(W, stats_of(X).H, cfg)
    assert shrink.shape == (24, 4) and set(shrink.unique().tolist()) <= {float(torch.tensor(r)) for r in cfg.shrinks}

    def per_group_error(r):  # float64 from X: sum over tokens of (group's part of the output error)^2
        d = (W - quantize_shrunk(W, cfg.quant, r)[3]).double().reshape(24, 4, 16)
        return torch.einsum("ngk,tgk->ntg", d, X.double().reshape(-1, 4, 16)).pow(2).sum(1)

    errs = torch.stack([per_group_error(r) for r in cfg.shrinks])  # (R, N, G)
    chosen = per_group_error(shrink)
    torch.testing.assert_close(chosen, errs.min(0).values, rtol=1e-4, atol=1e-6)
    assert shrink[0, 0] < 1 and (chosen <= errs[0] * (1 + 1e-6)).all()


def test_folding_scales_preserves_the_function(llama_mha):
    """Every mapping of the table, folded with random scales: the float model computes the same outputs."""
    from minquant.models import LLAMA

    ids = windows(4, 16)
    weights = copy.deepcopy(llama_mha.state_dict())
    with torch.no_grad():
        before = llama_mha(ids).logits
        g = torch.Generator().manual_seed(5)
        for block in llama_mha.model.layers:
            for group, prev in zip(LLAMA.groups, LLAMA.awq_prev):
                linears = [block.get_submodule(n) for n in group]
                fold_scale(block.get_submodule(prev), linears, torch.rand(linears[0].in_features, generator=g) * 4 + 0.1)
        after = llama_mha(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # Same outputs alone would pass a fold that did nothing: the scales must have moved exactly the weights of
    # every norm and linear in a mapping (both sides of each fold), and nothing else.
    folded = {f"model.layers.{i}.{name}.weight" for i in range(len(llama_mha.model.layers))
              for group, prev in zip(LLAMA.groups, LLAMA.awq_prev) for name in (prev, *group)}
    changed = {k for k, w in llama_mha.state_dict().items() if not torch.equal(w, weights[k])}
    assert changed == folded


def _tiny(family):
    import transformers as T

    torch.manual_seed(0)
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)).eval()
    return T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_folding_is_exact_for_every_mapping_of_other_families(family):
    """OPT folds into its pre-norms and through ReLU (fc1 -> fc2); BERT (post-norm, GELU) only value -> output.dense."""
    from minquant.models import architecture, find_blocks

    model = _tiny(family)
    arch = architecture(model)
    ids = windows(3, 16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() and p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norms and their biases away from 1 and 0
        out = lambda: model(ids).logits if family == "opt" else model(ids).last_hidden_state
        before = out()
        g = torch.Generator().manual_seed(6)
        folded = 0
        for block in find_blocks(model, arch):
            for group, prev in zip(arch.groups, arch.awq_prev):
                if prev is not None:
                    linears = [block.get_submodule(n) for n in group]
                    fold_scale(block.get_submodule(prev), linears, torch.rand(linears[0].in_features, generator=g) * 4 + 0.1)
                    folded += 1
        after = out()
    assert folded == (8 if family == "opt" else 2)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_awq_on_opt_and_post_norm_opt_refused():
    model = _tiny("opt")
    search, _ = awq_quantize_model(model, windows(), AWQConfig(QuantConfig(4, 32), n_grid=4), progress=False)
    assert len(search.mappings) == 8 and sum(isinstance(m, QuantLinear) for m in model.modules()) == 12
    post = _tiny("opt")
    post.config.do_layer_norm_before = False
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        awq_quantize_model(post, windows(), AWQConfig(QuantConfig(4, 32)), progress=False)


def test_alpha_zero_without_clipping_is_exactly_rtn(llama_mha):
    import minquant

    rtn = minquant.quantize(copy.deepcopy(llama_mha), "rtn", bits=4, group_size=32, progress=False)
    awq = copy.deepcopy(llama_mha)
    search, _ = awq_quantize_model(awq, windows(), AWQConfig(QuantConfig(4, 32), n_grid=1, clip=False), progress=False)
    assert set(search.alphas.values()) == {0.0} and not search.clips
    ours = {n: m for n, m in awq.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in rtn.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(ours[name], buf), getattr(theirs[name], buf)), (name, buf)
    for (n, a), b in zip(awq.named_parameters(), rtn.parameters()):
        assert torch.equal(a, b), n  # norms untouched by scales of 1


def test_saved_search_reapplied_gives_identical_weights(llama_mha, tmp_path):
    fresh = copy.deepcopy(llama_mha)
    search, report = awq_quantize_model(llama_mha, windows(), AWQConfig(QuantConfig(3, 32)), progress=False)
    assert len(search.mappings) == 8 and len(search.clips) == 10  # 4 mappings, 5 clipped linears (not q, k) x 2 blocks
    assert search.clips["model.layers.0.mlp.down_proj"].min() < 1  # clipping happened somewhere
    assert any(a > 0 for a in search.alphas.values())
    loaded = AWQSearch.load(search.save(tmp_path / "awq.safetensors"))
    assert loaded.config == search.config and loaded.mappings == search.mappings
    apply_awq(fresh, loaded)
    a, b = llama_mha.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = windows(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(llama_mha(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def test_awq_beats_rtn_on_a_model(llama_mha):
    """Output error of the last block's down_proj-free logits: AWQ's model is closer to the float one than RTN's."""
    import minquant

    ids = windows(16, 24, seed=1)
    with torch.no_grad():
        ref = llama_mha(ids).logits
        rtn = minquant.quantize(copy.deepcopy(llama_mha), "rtn", bits=3, group_size=32, progress=False)
        awq = copy.deepcopy(llama_mha)
        awq_quantize_model(awq, windows(), AWQConfig(QuantConfig(3, 32)), progress=False)
        err = lambda m: float((m(ids).logits - ref).pow(2).mean())
        assert err(awq) < err(rtn)


def test_grouped_query_attention_skips_v_to_o(tiny_llama):
    search, _ = awq_quantize_model(tiny_llama, windows(), AWQConfig(QuantConfig(4, 32), n_grid=3), progress=False)
    assert [p.rsplit(".", 1)[-1] for p, _ in search.mappings] == ["input_layernorm", "post_attention_layernorm", "up_proj"] * 2


def test_bad_input(tiny_llama, monkeypatch, tmp_path):
    from minquant import models

    with pytest.raises(ValueError, match="bits"):
        AWQConfig(QuantConfig(9))
    with pytest.raises(ValueError, match="n_grid"):
        AWQConfig(n_grid=0)
    with pytest.raises(ValueError, match="calibration data"):
        awq_quantize_model(copy.deepcopy(tiny_llama), torch.zeros(0, 8, dtype=torch.long), AWQConfig(QuantConfig(4, 32)), progress=False)
    with pytest.raises(ValueError, match="group_size 48"):
        awq_quantize_model(copy.deepcopy(tiny_llama), windows(), AWQConfig(QuantConfig(4, 48)), progress=False)
    nan = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        nan.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="block 1 mlp.up_proj: weight has 1 NaN"):
        awq_quantize_model(nan, windows(), AWQConfig(QuantConfig(4, 32)), progress=False)
    monkeypatch.setitem(models.ARCHITECTURES, "llama", replace(models.LLAMA, awq_prev=None))
    with pytest.raises(ValueError, match="no AWQ mapping.*opt.*awq_prev"):
        awq_quantize_model(tiny_llama, windows(), AWQConfig(QuantConfig(4, 32)), progress=False)
    with pytest.raises(ValueError, match="not an AWQ search"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "not-awq.safetensors")
        AWQSearch.load(tmp_path / "not-awq.safetensors")
