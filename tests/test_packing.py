"""minquant.packing: exact round trips for every value of every width, and the GPTQ layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minquant.packing import check_packable, from_gptq, pack, to_gptq, unpack
from minquant.quant import QuantConfig, choose_qparams, quantize, storable_qparams


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("word_bits", [8, 32])
def test_every_value_round_trips(bits, word_bits):
    # every value at every position of a chunk: a run of all 2**bits values, rotated once per row
    values = torch.arange(2**bits).repeat(96 // 2**bits + 1)[:96]
    q = torch.stack([values.roll(r) for r in range(2**bits)]).to(torch.uint8)      # (rows, 96)
    for dim in (0, 1):
        x = q if dim == 1 else q.t().contiguous()
        assert torch.equal(unpack(pack(x, bits, word_bits, dim), bits, word_bits, dim), x)


def reference_bitstream(column, bits):
    """Independent reference: build the bit string by hand, cut it into 32-bit little-endian words."""
    stream = "".join(format(int(v), f"0{bits}b")[::-1] for v in column)        # LSB first
    return [int(stream[i:i + 32][::-1], 2) for i in range(0, len(stream), 32)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_words_match_a_hand_built_bitstream(bits):
    q = torch.randint(0, 2**bits, (64, 3), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack(q, bits, dim=0)
    for n in range(3):
        assert [w & 0xFFFFFFFF for w in words[:, n].tolist()] == reference_bitstream(q[:, n].tolist(), bits)


def test_worked_example_in_the_docstring():
    q = torch.tensor([3, 10, 0, 0, 0, 0, 0, 15], dtype=torch.uint8).reshape(8, 1)
    assert pack(q, 4, dim=0).item() & 0xFFFFFFFF == 0xF00000A3
    assert pack(q.reshape(1, 8), 4, word_bits=8, dim=1).tolist() == [[0xA3, 0x00, 0x00, 0xF0]]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), chunks=st.integers(1, 4), rows=st.integers(1, 5), seed=st.integers(0, 999))
def test_round_trip_property(bits, chunks, rows, seed):
    n = chunks * {2: 16, 3: 32, 4: 8, 8: 4}[bits]
    q = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(unpack(pack(q, bits, dim=1), bits, dim=1), q)


def test_shapes_that_cannot_be_packed():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(40, 2, dtype=torch.uint8), 3, dim=0)
    with pytest.raises(ValueError, match=r"K \(in_features\) = 100 must be a multiple of 8"):
        check_packable(64, 100, QuantConfig(4, -1))
    with pytest.raises(ValueError, match=r"N \(out_features\) = 48 must be a multiple of 32"):
        check_packable(48, 64, QuantConfig(3, 32))
    with pytest.raises(ValueError, match="values must be in 0..15"):
        pack(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match=r"can pack \(2, 3, 4, 8\) bits, not 5"):
        pack(torch.zeros(8, 1), 5)


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32), QuantConfig(3, 64), QuantConfig(2, -1), QuantConfig(8, 32, symmetric=True)])
def test_gptq_layout_round_trip(cfg):
    w = torch.randn(64, 128) * 0.05
    scale, zero = storable_qparams(w, cfg)
    q = quantize(w, scale, zero, cfg)
    t = to_gptq(q, scale, zero, cfg)
    G = cfg.groups(128)
    assert t["qweight"].shape == (128 * cfg.bits // 32, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (G, 64 * cfg.bits // 32) and t["scales"].shape == (G, 64)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].tolist() == [k // (128 // G) for k in range(128)]
    q2, s2, z2, _ = from_gptq(t, cfg.bits)
    assert torch.equal(q2, q) and torch.equal(z2, zero) and torch.equal(s2, scale)
    if cfg.symmetric:  # GPTQ's symmetric convention: zero 2**(bits-1), stored as 2**(bits-1) - 1
        assert set(unpack(t["qzeros"], cfg.bits, dim=1).flatten().tolist()) == {2 ** (cfg.bits - 1) - 1}


def test_zero_point_zero_is_made_storable():
    w = torch.rand(32, 64)  # all positive: min/max puts the zero-point at 0, which v1 cannot store
    cfg = QuantConfig(4, 32)
    assert (choose_qparams(w, cfg)[1] == 0).all()
    with pytest.raises(ValueError, match="zero-point of 0 cannot be stored"):
        to_gptq(quantize(w, *choose_qparams(w, cfg), cfg), *choose_qparams(w, cfg), cfg)
    scale, zero = storable_qparams(w, cfg)
    assert (zero == 1).all()
    w_hat = (quantize(w, scale, zero, cfg).float() - 1) * scale.repeat_interleave(32, dim=1)
    assert ((w - w_hat).abs() <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()  # nothing clipped
