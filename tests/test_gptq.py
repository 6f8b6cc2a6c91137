"""GPTQ: the matrix algorithm against RTN and a float64 one-column-at-a-time OBQ reference; the
block driver against the Hessians a plain forward of the finished model gives."""
import copy
import warnings

import pytest
import torch

from minquant.gptq import GPTQConfig, gptq_quantize, gptq_quantize_model, hessian_inverse_cholesky, search_qparams
from minquant.nn import QuantLinear
from minquant.quant import QuantConfig, quantize, storable_qparams

CONFIGS = [GPTQConfig(QuantConfig(4, 32)), GPTQConfig(QuantConfig(4, -1, symmetric=True)), GPTQConfig(QuantConfig(3, 32), act_order=True),
           GPTQConfig(QuantConfig(4, 32, symmetric=True), act_order=True, static_groups=True), GPTQConfig(QuantConfig(2, 64)), GPTQConfig(QuantConfig(8, 16, symmetric=True)),
           GPTQConfig(QuantConfig(4, 32), search_range=True), GPTQConfig(QuantConfig(3, -1, symmetric=True), act_order=True, search_range=True),
           GPTQConfig(QuantConfig(4, 32, symmetric=True, full_range=True))]


def correlated(n=2048, K=128, seed=0):
    """Inputs with correlated features and uneven scales, like a real layer's; H = 2 X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g) * 0.3 + torch.randn(n, K, generator=g)
    X *= torch.rand(K, generator=g) * 3 + 0.1
    return X, 2 * X.T @ X / n


def rtn(W, cfg: GPTQConfig):
    s, z = (search_qparams if cfg.search_range else storable_qparams)(W, cfg.quant)
    return quantize(W, s, z, cfg.quant), s, z


def output_error(X, W, W_hat):
    return float(((X.double() @ (W.double() - W_hat.double()).T) ** 2).sum())


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_identity_hessian_is_exactly_rtn(cfg):
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    r = gptq_quantize(W, torch.eye(128), cfg)
    q, s, z = rtn(W, cfg)
    assert torch.equal(r.q, q) and torch.equal(r.scale, s) and torch.equal(r.zero, z)
    assert torch.equal(r.g_idx.long(), torch.arange(128) // (cfg.quant.group_size if cfg.quant.group_size > 0 else 128))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_output_error_below_rtn_and_loss_is_the_output_error(cfg):
    X, H = correlated()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    r = gptq_quantize(W, H, cfg)
    q, s, z = rtn(W, cfg)
    W_rtn = (q.float() - z.repeat_interleave(W.shape[1] // s.shape[1], 1)) * s.repeat_interleave(W.shape[1] // s.shape[1], 1)
    err_gptq, err_rtn = output_error(X, W, r.dequantize()), output_error(X, W, W_rtn)
    assert err_gptq < err_rtn
    # the sweep's summed OBQ costs are exactly the objective 1/2 tr((W - Q) H (W - Q)^T), H damped as GPTQ damps it
    D = (W - r.dequantize()).double()
    H_damped = H.double() + r.damp * H.diagonal().mean().double() * torch.eye(128, dtype=torch.float64)
    assert r.loss == pytest.approx(float((D @ H_damped * D).sum()) / 2, rel=1e-3)


@pytest.mark.parametrize("qc,rows", [(QuantConfig(4, 32), 24), (QuantConfig(3, 16, symmetric=True), 24),
                                     (QuantConfig(2, -1), 24), (QuantConfig(4, 32), 820)], ids=str)
def test_search_range_picks_the_best_narrowed_range(qc, rows):
    """Per group: never worse than min/max, the argmin over the grid p = 1, 0.99, ..., 0.21, and it
    does clip: a group with one outlier gets a narrower range than its min/max. 820 rows make the
    search split the 80 candidates into chunks (of 5), whose winners must then be merged."""
    from minquant.quant import dequantize

    W = torch.randn(rows, 64, generator=torch.Generator().manual_seed(3))
    W[0, 5] = 9.0  # an outlier in row 0's first group
    s, z = search_qparams(W, qc)

    def error(scale, zero):  # float64 |w - w_q|^2.4 per group
        d = (W.double() - dequantize(quantize(W, scale, zero, qc), scale, zero, qc).double()).abs() ** 2.4
        return d.reshape(*scale.shape, -1).sum(-1)

    per_p = torch.stack([error(*storable_qparams(W, QuantConfig(qc.bits, qc.group_size, qc.symmetric, clip_ratio=1 - i / 100)))
                         for i in range(80)])
    chosen = error(s, z)
    assert (chosen <= per_p[0] * (1 + 1e-9)).all()  # min/max is p = 1
    torch.testing.assert_close(chosen, per_p.min(0).values, rtol=1e-6, atol=0)
    assert s[0, 0] < storable_qparams(W, qc)[0][0, 0]
    assert (chosen < per_p[0] * 0.999).float().mean() > 0.3  # it matters for many groups, not only the outlier's


def obq_reference(W, H, cfg: GPTQConfig):
    """Float64, one column at a time, inverting the remaining block of H at every step (no Cholesky,
    no lazy batches): what GPTQ computes, written the slow and obvious way."""
    W, H = W.double().clone(), H.double().clone()
    K = W.shape[1]
    H += cfg.damp * H.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    g = K if cfg.quant.group_size == -1 else cfg.quant.group_size
    one = QuantConfig(cfg.quant.bits, -1, cfg.quant.symmetric)
    Q = torch.zeros_like(W)
    for j in range(K):
        if j % g == 0:
            s, z = (t[:, 0].double() for t in storable_qparams(W[:, j:j + g].float(), one))
        Hinv = torch.linalg.inv(H[j:, j:])
        q = (torch.round(W[:, j] / s) + z).clamp(one.minq, one.maxq)
        Q[:, j] = (q - z) * s
        err = (W[:, j] - Q[:, j]) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0][None, :]
    return Q


@pytest.mark.parametrize("cfg", [GPTQConfig(QuantConfig(4, 32)), GPTQConfig(QuantConfig(3, -1, symmetric=True)), GPTQConfig(QuantConfig(4, 64), block_size=16)], ids=str)
def test_matches_float64_obq_reference(cfg):
    X, H = correlated(K=96 if cfg.quant.group_size != 64 else 128)
    W = torch.randn(32, H.shape[0], generator=torch.Generator().manual_seed(3))
    ours = gptq_quantize(W, H, cfg).dequantize().double()
    ref = obq_reference(W, H, cfg)
    same = (ours - ref).abs() < 1e-4
    assert same.float().mean() > 0.99  # float32 vs float64 may flip a rounding tie or two
    assert output_error(X, W, ours) == pytest.approx(output_error(X, W, ref), rel=0.01)


def test_block_size_does_not_change_the_result():
    X, H = correlated()
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    a = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 32), block_size=128))
    b = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 32), block_size=32))
    assert (a.q != b.q).float().mean() < 0.01


def test_act_order_g_idx_is_honoured_by_packing_and_the_reference_kernel():
    X, H = correlated()
    W = torch.randn(40, 128, generator=torch.Generator().manual_seed(5))
    r = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 32), act_order=True))
    assert not torch.equal(r.g_idx.long(), torch.arange(128) // 32)  # the groups really are permuted
    assert torch.bincount(r.g_idx.long()).tolist() == [32] * 4  # still group_size columns per group
    # columns swept first (largest H_jj) are in group 0
    first = torch.argsort(H.diagonal(), descending=True)[:32]
    assert set(r.g_idx[first].tolist()) == {0}
    layer = QuantLinear.from_quantized(r.q, r.scale, r.zero, r.g_idx, QuantConfig(4, 32))
    torch.testing.assert_close(layer.dequantize_weight(), r.dequantize())
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x).double(), x.double() @ r.dequantize().double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [32, -1])
def test_act_order_helps_when_the_big_inputs_come_last(group_size):
    """Sweeping the largest inputs first leaves the most columns to absorb their rounding errors."""
    X, _ = correlated(seed=3)
    X[:, [120, 121, 122, 127]] *= 30  # a few very large input features, as in LLM activations
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    plain = output_error(X, W, gptq_quantize(W, H, GPTQConfig(QuantConfig(3, group_size))).dequantize())
    ordered = output_error(X, W, gptq_quantize(W, H, GPTQConfig(QuantConfig(3, group_size), act_order=True)).dequantize())
    assert ordered < 0.7 * plain


def test_dead_inputs_are_handled():
    X, _ = correlated(K=64)
    X[:, [3, 17]] = 0  # two inputs that never fire: H has zero rows and columns
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(16, 64)
    r = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 32)))
    assert torch.isfinite(r.dequantize()).all()
    assert (r.dequantize()[:, [3, 17]] == 0).all()  # zeroed: their weights never matter
    assert output_error(X, W, r.dequantize()) < output_error(X, W, torch.zeros_like(W))


def test_not_positive_definite_hessian_gets_more_damping_with_a_warning():
    _, H = correlated(K=64)
    lam_min = torch.linalg.eigvalsh(H)[0]
    H = H - (lam_min + 0.05 * H.diagonal().mean()) * torch.eye(64)  # smallest eigenvalue -5% of the mean diagonal
    with pytest.warns(UserWarning, match="damping raised to 0.1"):
        r = gptq_quantize(torch.randn(8, 64), H, GPTQConfig(QuantConfig(4, 32)))
    assert r.damp == pytest.approx(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy H: no warning, damping as asked
        assert gptq_quantize(torch.randn(8, 64), correlated(K=64)[1], GPTQConfig(QuantConfig(4, 32))).damp == 0.01
    with pytest.raises(ValueError, match="not positive definite"):
        hessian_inverse_cholesky(-torch.eye(8), 0.01)


@pytest.mark.parametrize("bad", [dict(damp=0), dict(block_size=0), dict(quant=QuantConfig(4, 32, integer_zero=False)),
                                 dict(quant=(4, 32)), dict(static_groups=True)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        GPTQConfig(**bad)


def test_bad_tensors():
    with pytest.raises(ValueError, match="W \\(N, K\\) and H \\(K, K\\)"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16), GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.full((4, 32), float("nan")), torch.eye(32), GPTQConfig(QuantConfig(4, 32)))
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), GPTQConfig(QuantConfig(4, 48)))


# ---------------------------------------------------------------------------------------------
# The whole model: the block driver
# ---------------------------------------------------------------------------------------------

def windows(n=12, seqlen=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def hessians_of(model, ids, names):
    """2 X X^T / n of each named linear's input, from one plain forward of the whole model."""
    H, n = {}, {}
    def hook(name):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.T @ x
            n[name] = n.get(name, 0) + x.shape[0]
        return f
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {name: 2 * H[name] / n[name] for name in names}


@pytest.mark.parametrize("replay", [True, False])
def test_driver_is_true_sequential(tiny_llama, replay):
    """Every group's H must come from inputs that already went through every quantized linear
    before it. Those inputs never change afterwards, so the finished model must reproduce them."""
    from minquant.calibrate import quantize_blocks_sequential

    ids = windows()
    seen = {}

    def quantize_group(linears, H):
        for name, linear in linears.items():
            seen[name] = H.double().clone()
            linear.weight.data = gptq_quantize(linear.weight, H, GPTQConfig(QuantConfig(3, 32))).dequantize()

    quantize_blocks_sequential(tiny_llama, ids, quantize_group, batch_size=5, replay=replay, progress=False)
    assert len(seen) == 14  # 7 linears x 2 blocks
    expected = hessians_of(tiny_llama, ids, list(seen))
    for name in seen:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_whole_block_driver_uses_each_blocks_float_inputs(tiny_llama):
    """quantize_blocks_one_pass (GPTQ's true_sequential=False, AWQ): all of a block's statistics come
    from one pass of the block as it arrives: float linears, inputs from the quantized blocks before."""
    from minquant.calibrate import quantize_blocks_one_pass
    from minquant.models import LLAMA

    ids = windows()
    float_model = copy.deepcopy(tiny_llama)
    seen, quantized = {}, {}

    def quantize_block(prefix, block, stats):
        for group, st in zip(LLAMA.groups, stats):
            assert st.n == ids.numel()
            for name in group:
                seen[f"{prefix}.{name}"] = (st.H.double().clone(), st.mean_abs.double().clone())
                linear = block.get_submodule(name)
                linear.weight.data = quantized[f"{prefix}.{name}"] = gptq_quantize(linear.weight, st.H, GPTQConfig(QuantConfig(2, 32))).dequantize()

    quantize_blocks_one_pass(tiny_llama, ids, quantize_block, batch_size=5, progress=False)
    block0 = [n for n in seen if ".0." in n]
    reference = copy.deepcopy(float_model)  # block 0 as the run left it, block 1 still float
    for name in block0:
        reference.get_submodule(name).weight.data = quantized[name]
    for model, names in ((float_model, block0), (reference, [n for n in seen if ".1." in n])):
        expected, handles, mean_abs = hessians_of(model, ids, names), [], {}
        for name in names:
            hook = lambda m, args, name=name: mean_abs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).double().abs().mean(0))
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            model(ids)
        for name in names:
            torch.testing.assert_close(seen[name][0], expected[name], rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(seen[name][1], mean_abs[name], rtol=1e-4, atol=1e-6, msg=name)
    # and not what true sequential would have given: o_proj's inputs did not go through quantized q/k/v
    true_seq = copy.deepcopy(float_model)
    for name in [n for n in block0 if "self_attn.q_proj" in n or "k_proj" in n or "v_proj" in n]:
        true_seq.get_submodule(name).weight.data = quantized[name]
    o = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(seen[o][0], hessians_of(true_seq, ids, [o])[o], rtol=1e-3)


def test_driver_sees_quantized_inputs_not_float_ones(tiny_llama):
    """The check above has teeth: the float model's Hessians differ from what the driver used."""
    from minquant.calibrate import quantize_blocks_sequential

    ids = windows()
    float_model = copy.deepcopy(tiny_llama)
    seen = {}

    def quantize_group(linears, H):
        for name, linear in linears.items():
            seen[name] = H.double().clone()
            linear.weight.data = gptq_quantize(linear.weight, H, GPTQConfig(QuantConfig(2, 32))).dequantize()

    quantize_blocks_sequential(tiny_llama, ids, quantize_group, progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(seen[name], hessians_of(float_model, ids, [name])[name], rtol=1e-3)


def test_quantize_model_gives_quantlinears_that_compute_what_gptq_chose(tiny_llama):
    ids = windows()
    fake = copy.deepcopy(tiny_llama)
    report = gptq_quantize_model(tiny_llama, ids, GPTQConfig(QuantConfig(4, 32), act_order=True), progress=False)
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and set(report["layers"]) == set(layers)
    assert isinstance(tiny_llama.lm_head, torch.nn.Linear)  # the head stays float
    for name, layer in layers.items():  # the same float weights in a plain model...
        fake.get_submodule(name).weight.data = layer.dequantize_weight()
    with torch.no_grad():  # ...compute the same logits as the QuantLinear model
        torch.testing.assert_close(tiny_llama(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantize_model_checks_every_layer_first(tiny_llama):
    tiny_llama.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="block 1 mlp.down_proj: weight has 1 NaN"):
        gptq_quantize_model(tiny_llama, windows(), GPTQConfig(QuantConfig(4, 32)), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())  # nothing was changed
    with pytest.raises(ValueError, match="group_size 48 does not divide the 64"):
        gptq_quantize_model(tiny_llama, windows(), GPTQConfig(QuantConfig(4, 48)), progress=False)


def test_bad_calibration_data(tiny_llama):
    with pytest.raises(ValueError, match="calibration data must be"):
        gptq_quantize_model(tiny_llama, torch.zeros(0, 16, dtype=torch.long), GPTQConfig(QuantConfig(4, 32)), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())


def test_unknown_family_names_the_supported_ones():
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="'gpt2' is not in minquant's architecture table; supported: .*llama.*"
                                         "add an Architecture entry"):
        gptq_quantize_model(model, windows(), GPTQConfig(QuantConfig(4, 32)), progress=False)


class _ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x):
        y = self.lin1(x)
        y += 1  # changes lin1's output in place: a recorded copy of it would go stale
        return x + self.lin2(y)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "toy"})()
        self.embed = torch.nn.Embedding(64, 32)
        self.blocks = torch.nn.ModuleList([_ToyBlock(), _ToyBlock()])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


def test_replay_refuses_outputs_changed_in_place(monkeypatch):
    """A new family in the table just works, and replay notices a block that edits outputs in place."""
    from minquant import models
    from minquant.calibrate import quantize_blocks_sequential

    monkeypatch.setitem(models.ARCHITECTURES, "toy", models.Architecture("blocks", (("lin1",), ("lin2",))))
    quantize = lambda linears, H: None
    torch.manual_seed(0)
    model = _Toy()
    with pytest.raises(RuntimeError, match="modified in place.*replay=False"):
        quantize_blocks_sequential(model, windows(4, 8), quantize, progress=False)
    quantize_blocks_sequential(model, windows(4, 8), quantize, replay=False, progress=False)
    assert "forward" not in vars(model.blocks[0].lin1)  # replays are always removed


class _Part(torch.nn.Module):
    """Two linears in a submodule that returns the second one's output as is, or does more with it."""

    def __init__(self, passes_through: bool):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)
        self.passes_through, self.calls = passes_through, 0

    def forward(self, x):
        self.calls += 1
        y = self.b(torch.relu(self.a(x)))
        return (y, None) if self.passes_through else (2 * y, None)


class _PartBlock(torch.nn.Module):
    def __init__(self, passes_through: bool):
        super().__init__()
        self.part, self.c = _Part(passes_through), torch.nn.Linear(32, 32)

    def forward(self, x):
        x = x + self.part(x)[0]
        return x + self.c(torch.tanh(x))


@pytest.mark.parametrize("passes_through", [True, False])
def test_a_part_that_returns_its_last_linear_is_not_run_again(monkeypatch, passes_through):
    """Once `part.b` is quantized, `part`'s outputs are b(its saved inputs): the block does not run it
    again. A part that does more with b's output is recorded by running it once more. Either way every
    H is the H of the finished model, and the next block receives the finished block's output."""
    from minquant import models
    from minquant.calibrate import quantize_blocks_sequential

    monkeypatch.setitem(models.ARCHITECTURES, "toy", models.Architecture("blocks", (("part.a",), ("part.b",), ("c",))))
    torch.manual_seed(0)
    model = _Toy()
    model.blocks = torch.nn.ModuleList([_PartBlock(passes_through), _PartBlock(passes_through)])
    ids = windows(6, 8)
    seen = {}

    def quantize_group(linears, H):
        for name, linear in linears.items():
            seen[name] = H.double().clone()
            linear.weight.data = gptq_quantize(linear.weight, H, GPTQConfig(QuantConfig(2, 16))).dequantize()

    quantize_blocks_sequential(model, ids, quantize_group, batch_size=4, progress=False)
    # part runs in the passes for a and for b; a third time (to be recorded) only if it is more than b
    assert [block.part.calls for block in model.blocks] == [2 * 2 + (0 if passes_through else 2)] * 2
    H, handles = {}, []
    for name in seen:
        hook = lambda m, args, name=name: H.__setitem__(name, 2 * (x := args[0].reshape(-1, args[0].shape[-1]).double()).T @ x / len(x))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for name in seen:
        torch.testing.assert_close(seen[name], H[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not any("forward" in vars(m) for m in model.modules())  # no replay or placeholder left behind


def test_llama_mlp_runs_once_per_batch(tiny_llama):
    """Llama's mlp returns down_proj's output: after the pass that finds down_proj's input, never again."""
    from minquant.calibrate import quantize_blocks_sequential

    calls = []
    for block in tiny_llama.model.layers:
        block.mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    quantize_blocks_sequential(tiny_llama, windows(), lambda linears, H: None, batch_size=5, progress=False)
    assert len(calls) == 3 * 2  # 3 batches x 2 blocks
