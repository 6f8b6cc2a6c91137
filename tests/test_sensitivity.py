import copy

import pytest
import torch

from minquant.quant import QuantConfig
from minquant.sensitivity import (LayerStats, collect_layer_stats, first_order_term, layer_names, measured_sensitivity,
                                  proxy_loss, quantized_weight, sensitivity_table, spearman)


def windows(n=4, seqlen=16, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def reference_stats(model, ids, name):
    """A and g2 of one linear by plain autograd: inputs kept by a hook, output gradients retained (float64 sums)."""
    linear = model.get_submodule(name)
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append((args[0], out))

    h = linear.register_forward_hook(keep)
    try:
        for row in ids:
            x = row[None]
            loss = model(input_ids=x, labels=x).loss * (x.shape[1] - 1)
            loss.backward()
    finally:
        h.remove()
        model.zero_grad()
    X = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in seen]).double()
    G = torch.cat([o.grad.reshape(-1, o.shape[-1]) for _, o in seen]).double()
    return X.T @ X / len(X), (G**2).mean(0), X, G


def test_layer_stats_match_plain_autograd(tiny_llama):
    ids = windows()
    stats = collect_layer_stats(tiny_llama, ids, batch_size=3, progress=False)
    assert list(stats) == layer_names(tiny_llama) and len(stats) == 14
    assert all(not p.requires_grad for p in tiny_llama.parameters()) is False  # weights left as they were
    for name in ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]:
        A, g2, _, _ = reference_stats(tiny_llama, ids, name)
        st = stats[name]
        assert st.n == ids.numel()
        torch.testing.assert_close(st.A.double(), A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.g2.double(), g2, rtol=1e-4, atol=1e-9)
    # the linears of one group read the same input: one A, shared
    assert stats["model.layers.0.self_attn.q_proj"].A is stats["model.layers.0.self_attn.v_proj"].A


def test_proxies_against_explicit_sums_over_tokens():
    g = torch.Generator().manual_seed(0)
    X, G = torch.randn(300, 32, generator=g, dtype=torch.float64), torch.randn(300, 16, generator=g, dtype=torch.float64)
    W = torch.randn(16, 32, generator=g)
    W_q = quantized_weight(W, QuantConfig(3, 8))
    st = LayerStats((X.T @ X / len(X)).float(), (G**2).mean(0).float(), len(X))
    out_err = (X @ (W_q - W).double().T) ** 2  # (tokens, N): each token's squared output error per channel
    assert proxy_loss(W, W_q, st, "output") == pytest.approx(float(out_err.mean(0).sum()), rel=1e-5)
    assert proxy_loss(W, W_q, st) == pytest.approx(float(0.5 * ((G**2).mean(0) * out_err.mean(0)).sum()), rel=1e-5)
    assert proxy_loss(W, W, st) == 0 and proxy_loss(W, W, st, "output") == 0  # identity quantization costs nothing
    with pytest.raises(ValueError, match="unknown proxy"):
        proxy_loss(W, W_q, st, "hessian")


def test_sensitivity_table_orders_bit_widths(tiny_llama):
    stats = collect_layer_stats(tiny_llama, windows(), progress=False)
    configs = {"W2": QuantConfig(2, 32), "W4": QuantConfig(4, 32), "W8": QuantConfig(8, 32), "fp16": None}
    for method in ("rtn", "gptq"):
        table = sensitivity_table(tiny_llama, stats, configs, method=method, progress=False)
        for name, row in table.items():
            assert row["fp16"] == 0 and row["W8"] < row["W4"] < row["W2"], (method, name, row)
    # GPTQ minimises the output error the "output" proxy measures: it never does worse than RTN there
    rtn = sensitivity_table(tiny_llama, stats, {"W3": QuantConfig(3, 32)}, proxy="output", progress=False)
    gptq = sensitivity_table(tiny_llama, stats, {"W3": QuantConfig(3, 32)}, proxy="output", method="gptq", progress=False)
    assert all(gptq[n]["W3"] <= rtn[n]["W3"] * 1.001 for n in rtn)


def test_measured_sensitivity_equals_full_forwards(tiny_llama):
    ids, cfg = windows(n=3), QuantConfig(2, 32)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    before = copy.deepcopy(tiny_llama.state_dict())
    base, deltas = measured_sensitivity(tiny_llama, ids, cfg, names, progress=False)

    def mean_nll(model):
        with torch.no_grad():
            return sum(float(model(input_ids=r[None], labels=r[None]).loss) for r in ids) / len(ids)

    assert base == pytest.approx(mean_nll(tiny_llama), rel=1e-6)
    for name in names:
        model = copy.deepcopy(tiny_llama)
        lin = model.get_submodule(name)
        lin.weight.data = quantized_weight(lin.weight.data, cfg)
        assert deltas[name] == pytest.approx(mean_nll(model) - base, rel=1e-4, abs=1e-6)
        assert deltas[name] != 0
    # the model is left exactly as it was: weights, and no replay left behind
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("forward" not in vars(m) for m in tiny_llama.modules())


def test_first_order_term_is_the_directional_derivative(tiny_llama):
    """g . dW against plain autograd of the mean NLL in float64, and against a finite difference along dW."""
    ids, cfg = windows(n=3), QuantConfig(2, 32)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    before = copy.deepcopy(tiny_llama.state_dict())
    fo = first_order_term(tiny_llama, ids, cfg, names, batch_size=2, progress=False)
    assert all(p.requires_grad for p in tiny_llama.parameters())  # the flags are restored
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    ref = copy.deepcopy(tiny_llama).double()

    def mean_nll():  # every window has the same length: the mean of the windows' means
        return sum(ref(input_ids=r[None], labels=r[None]).loss for r in ids) / len(ids)

    for name in names:
        lin = ref.get_submodule(name)
        W = lin.weight.data.clone()
        dW = (quantized_weight(W.float(), cfg) - W.float()).double()
        (g,) = torch.autograd.grad(mean_nll(), lin.weight)
        assert fo[name] == pytest.approx(float((g * dW).sum()), rel=1e-5)
        with torch.no_grad():  # the loss is computed partly in float32 (norms, loss): a coarse step, a loose check
            lin.weight.data = W + 1e-2 * dW
            up = float(mean_nll())
            lin.weight.data = W - 1e-2 * dW
            down = float(mean_nll())
        lin.weight.data = W
        assert fo[name] == pytest.approx((up - down) / 2e-2, rel=3e-2)
        assert abs(fo[name]) > 1e-5


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ties take their mean rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), then Pearson by hand
    ra, rb = torch.tensor([1, 2.5, 2.5, 4], dtype=torch.float64), torch.tensor([1, 3, 2, 4], dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman([5, 7, 7, 9], [0.1, 0.3, 0.2, 0.4]) == pytest.approx(float((ra @ rb) / (ra.norm() * rb.norm())))
    with pytest.raises(ValueError):
        spearman([1], [1])


@pytest.mark.slow
def test_sensitivity_bench_on_smollm2_matches_a_direct_measurement(smollm2, tmp_path):
    """The bench's saved numbers, on a small scale, against quantizing the layer in a copy and scoring it directly."""
    import json

    from minquant.bench.sensitivity import run as bench_sensitivity
    from minquant.data import load_text
    from minquant.eval import eval_ids
    from minquant.nn import QuantLinear

    names = ["model.layers.29.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    path = bench_sensitivity(eval_windows=1, seqlen=128, names=names, stats_samples=2, out=tmp_path / "s.json")
    res = json.loads(path.read_text())["results"]
    assert list(res["measured"]) == names and len(res["proxies"]["fisher (rtn)"]) == 210
    fo = res["proxies"]["first order (measured windows)"]
    assert set(fo) == set(names) and set(res["first_order_agreement"]) == {
        "measured windows vs next validation windows", "measured windows vs C4"}
    assert res["proxies"]["fisher (rtn) + first order (measured windows)"][names[0]] == pytest.approx(
        res["proxies"]["fisher (rtn)"][names[0]] + fo[names[0]])
    model, tok = smollm2
    ids = eval_ids(load_text("wikitext2", "validation"), tok)[:, :128]
    with torch.no_grad():
        base = float(model(input_ids=ids, labels=ids).loss)
        assert abs(res["base_nll"] - base) < 1e-4
        for name in names:
            other = copy.deepcopy(model)  # the layer as a stored QuantLinear (packed ints, fp16 scales)
            other.set_submodule(name, QuantLinear.from_linear(other.get_submodule(name), QuantConfig(3, 64)))
            assert abs(res["measured"][name] - (float(other(input_ids=ids, labels=ids).loss) - base)) < 1e-4
