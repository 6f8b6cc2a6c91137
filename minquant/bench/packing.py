"""`minquant bench packing`: bytes on disk of a 4096 x 4096 layer and of SmolLM2 in fp32, fp16 and int4 (notebook 05)."""
from __future__ import annotations

from pathlib import Path

import torch

from minquant.bench.results import save_results
from minquant.quant import QuantConfig

NAME = "packing_smollm2"


def run(out: Path | None = None) -> Path:
    """Bytes on disk: a 4096x4096 layer at 4-bit g128, and SmolLM2 in fp32, fp16 and int4 g64."""
    import copy
    import tempfile

    from safetensors.torch import save_file

    from minquant.checkpoint import save_quantized
    from minquant.memory import weight_bytes
    from minquant.models import load_model
    from minquant.nn import QuantLinear
    from minquant.rtn import quantize_to_quantlinear

    tmp = Path(tempfile.mkdtemp())
    layer = QuantLinear.from_linear(torch.nn.Linear(4096, 4096, bias=False), QuantConfig(4, 128))
    save_file(layer.state_dict(), tmp / "layer.safetensors")
    layer_bytes, fp16_bytes = (tmp / "layer.safetensors").stat().st_size, 4096 * 4096 * 2

    model, tokenizer = load_model("smollm2-135m")
    files = {}
    for fmt, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / f"{fmt}.safetensors")
        files[fmt] = (tmp / f"{fmt}.safetensors").stat().st_size
    int4 = copy.deepcopy(model)
    quantize_to_quantlinear(int4, QuantConfig(4, 64))
    save_quantized(int4, tokenizer, tmp / "int4")
    files["int4 g64"] = (tmp / "int4" / "model.safetensors").stat().st_size
    analytic = {"fp32": weight_bytes(model.config, "fp32").total, "fp16": weight_bytes(model.config, "fp16").total,
                "int4 g64": weight_bytes(model.config, "int4", 64, linears_only=True).total}
    smollm2 = [{"format": f, "file_bytes": files[f], "analytic_bytes": analytic[f],
                "ratio_to_fp16": files[f] / files["fp16"]} for f in files]
    for r in smollm2:
        print(f"SmolLM2 {r['format']:9} file {r['file_bytes'] / 1e6:8.2f} MB   accounting {r['analytic_bytes'] / 1e6:8.2f} MB")
    protocol = {"layer": "nn.Linear(4096, 4096) at QuantConfig(4, 128), its QuantLinear state_dict in safetensors",
                "smollm2": "state_dict in safetensors (tied lm_head once); int4: minquant.checkpoint.save_quantized"}
    results = {"layer_4096": {"int4_g128_bytes": layer_bytes, "fp16_bytes": fp16_bytes,
                              "ratio_to_fp16": layer_bytes / fp16_bytes}, "smollm2": smollm2}
    return save_results(NAME, protocol, results, out)


def table(record: dict) -> str:
    """Bytes on disk (README table), from a `packing_smollm2` record."""
    layer = record["results"]["layer_4096"]
    lines = [f"Bytes of saved safetensors files, measured {record['date'][:10]} by `{record['command']}`, next to "
             "`minquant.memory`'s accounting (int4: linear layers in 4 bits with an fp16 scale and 4-bit zero per "
             f"group of 64, the rest fp16). One 4096 x 4096 layer at 4-bit g128: {layer['int4_g128_bytes']:,} bytes, "
             f"{layer['ratio_to_fp16']:.4f}x its fp16 size.", "",
             "| SmolLM2-135M | file MB | accounting MB | file / fp16 file |", "|---|---:|---:|---:|"]
    for r in record["results"]["smollm2"]:
        lines.append(f"| {r['format']} | {r['file_bytes'] / 1e6:.2f} | {r['analytic_bytes'] / 1e6:.2f} | "
                     f"{r['ratio_to_fp16']:.3f}x |")
    return "\n".join(lines)
