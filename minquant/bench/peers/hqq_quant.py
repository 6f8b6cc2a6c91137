"""HQQ (half-quadratic quantization) on the same model and evaluation as `minquant bench gptq` (notebook 07's table).

HQQ needs no calibration data: it fits each group's scale and float zero point to the weights
alone, by a few steps of a proximal solver on a sparsity-promoting ||W - dequant(quant(W))||_p
(p < 1) error. It has no symmetric mode. Run inside HQQ's own venv (the bench builds it):
    python -m minquant.bench.peers.hqq_quant --bits 4 --group-size 64 --out result.json
Writes one JSON object: perplexity, quantization seconds, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="-1: one group per output channel")
    p.add_argument("--sym", action="store_true", help="refused: HQQ's zero point is a float")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.sym:
        p.error("HQQ has no symmetric mode")

    from importlib.metadata import version

    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from minquant.eval import perplexity
    from minquant.models import architecture, find_blocks, load_model
    from minquant.meter import PeakMemory

    model, tok = load_model(a.model)
    arch = architecture(model)
    # HQQ's defaults (its proximal solver on, groups along the input dimension: axis=1, like GPTQ's)
    config = BaseQuantizeConfig(nbits=a.bits, group_size=a.group_size if a.group_size > 0 else None, axis=1)
    with PeakMemory(reset=False) as peak:  # since this process started: its model load included
        start = time.perf_counter()
        with torch.no_grad():
            for block in find_blocks(model, arch):
                for name in arch.linears:
                    linear = block.get_submodule(name)
                    layer = HQQLinear(linear, config, del_orig=False, compute_dtype=torch.float32, device="cpu")
                    # HQQLinear's forward is x @ dequantize().T (+ bias): the float model with these weights is the same
                    linear.weight.data = layer.dequantize().reshape(linear.weight.shape).to(linear.weight.dtype)
        seconds = time.perf_counter() - start
    peak_rss = peak.bytes
    ppl = perplexity(model, tok, "wikitext2", seqlen=a.eval_seqlen, max_windows=a.eval_windows, progress=False)
    result = {"tool": "hqq", "version": version("hqq"), "method": "HQQLinear (defaults)",
              "bits": a.bits, "group_size": a.group_size, "sym": False, "ppl": ppl.ppl, "quantize_seconds": seconds,
              "peak_rss_bytes": peak_rss, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
