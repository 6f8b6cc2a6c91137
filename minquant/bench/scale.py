"""`minquant bench scale`: quantizing a model bigger than memory, measured (minquant/stream.py, README
"Quantizing a big model").

A random-init Llama-shaped model is written as safetensors shards (`make_model`, a shard's tensors at a
time: the maker never holds it whole either). Each run then happens in a fresh process, so that its
peak resident memory (VmHWM) is its own: the streamed path (`minquant.quantize(folder, out_dir=...)`)
and, with `compare`, the in-memory path (load the float model, quantize, save) on the same model and
calibration, whose checkpoints are then compared tensor by tensor, bit for bit.

    minquant bench scale                              # CPU: a 3.3 GB fp32 Llama, RTN and GPTQ, both paths
    minquant bench scale --shape llama-3-8b --device cuda --methods gptq awq   # a GPU: bf16 shards, streamed only
    minquant bench scale --shape llama-3-70b --blocks 2 --device cuda --methods gptq awq   # 70B's blocks

Writes data/results/scale_cpu.json (or scale_<gpu>.json; a shape other than the device's default adds
its name). `--blocks N` keeps the shape's first N blocks: the streamed peak is the whole model's (one
block is held at a time), and the table estimates the whole shape's time from theirs, labelled so.
On a bare GPU machine (no packaged model, no data, nothing installs): `make gpu-kit` here, carry `.gpu`,
and run there with `PYTHONPATH=$PWD MINQUANT_DATA=$PWD/.gpu/data ... --tokenizer .gpu/tokenizer`.

The memory target the issue set: peak RSS below half the model, and within (largest block + embeddings
+ calibration activations) x 1.2 above what the interpreter holds once torch and transformers are
imported (`baseline_rss`, with the CUDA context on a GPU); "embeddings" are the input embedding and the
output head, the two tensors the streamed path reads whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama configs; vocab 49152 = SmolLM2's tokenizer, whose ids the calibration uses
    "cpu-3gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=14, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "ci": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(folder: Path, shape: str | dict, dtype: str = "fp32", max_shard_size: str = "1GB", seed: int = 0,
               blocks: int | None = None, tokenizer: str = "smollm2-135m", device: str = "cpu") -> Path:
    """Write a random Llama (weights N(0, 0.02) as transformers initialises them, norms 1) as shards, with SmolLM2's
    tokenizer (`tokenizer`: a packaged name or a folder holding it); `blocks` keeps only the first N decoder blocks
    of the shape. One shard's tensors in memory at a time; the numbers are drawn on `device` (a GPU draws 16 GB in
    seconds). Atomic: the folder is whole or absent."""
    import transformers as T

    from minquant.atomic import new_folder
    from minquant.shards import ShardWriter, parse_size

    fields = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if blocks is not None:
        if not 1 <= blocks <= fields["num_hidden_layers"]:
            raise ValueError(f"blocks={blocks}: the shape has {fields['num_hidden_layers']} blocks")
        fields["num_hidden_layers"] = blocks
    config = T.LlamaConfig(max_position_embeddings=4096, **fields)
    config.dtype = DTYPES[dtype]
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(config)
    gen = torch.Generator(device).manual_seed(seed)
    max_bytes = parse_size(max_shard_size)
    with new_folder(folder, overwrite=True) as tmp:
        # tensors are handed over a shard's worth at a time, grouped as the writer groups them, so that each
        # shard is one part file, renamed into place rather than copied (16 GB once, not twice)
        writer, group, size = ShardWriter(tmp, max_bytes), {}, 0
        for name, t in meta.state_dict().items():
            nbytes = t.numel() * DTYPES[dtype].itemsize
            if group and size + nbytes > max_bytes:
                writer.add(group)
                group, size = {}, 0
            value = (torch.ones(t.shape) if name.endswith("norm.weight")
                     else torch.randn(t.shape, generator=gen, device=device) * 0.02)
            group[name], size = value.to(DTYPES[dtype]).cpu(), size + nbytes
        writer.add(group)
        writer.close()
        config.save_pretrained(tmp)
        _tokenizer(tokenizer).save_pretrained(tmp)
    return folder


def _tokenizer(name: str):
    """SmolLM2's tokenizer (whose ids the calibration uses) from its package, or from a folder that holds it (a
    machine without the packaged model: `make gpu-kit` saves one)."""
    from minquant.checkpoint import load_tokenizer
    from minquant.models import PACKAGED, cached_source

    if name in PACKAGED:
        return load_tokenizer(Path(cached_source(name)))
    if not (Path(name) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"tokenizer {name!r}: neither a packaged model nor a folder with tokenizer_config.json")
    return load_tokenizer(Path(name))


def model_bytes(folder: Path) -> dict:
    """Sizes from the shards' headers: the whole model, its largest block, its embeddings (input and output)."""
    from minquant.shards import Checkpoint

    ck = Checkpoint(folder)
    size = {n: end - start for n, (start, end) in ck.span.items()}
    blocks: dict[str, int] = {}
    for n, b in size.items():
        m = re.match(r"(model\.layers\.\d+)\.", n)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + b
    return {"model": sum(size.values()), "largest_block": max(blocks.values()), "blocks": len(blocks),
            "embeddings": size.get("model.embed_tokens.weight", 0) + size.get("lm_head.weight", 0)}


def child(args: list[str]) -> dict:
    """One run, in this (fresh) process: print what it measured as JSON on the last line."""
    mode, method, src, out, n_samples, seqlen, device, batch_size = args
    import importlib

    import minquant

    for module in ("safetensors.torch", "transformers.models.llama.modeling_llama", "minquant.awq", "minquant.gptq",
                   "minquant.stream"):  # before the baseline is read: every run needs them
        importlib.import_module(module)

    if device != "cpu":  # the CUDA context (some hundred MB of host memory) is part of the baseline, not of the run
        torch.zeros(1, device=device)
    baseline = _status("VmRSS")
    calib = {} if method == "rtn" else {"calib": "c4", "n_samples": int(n_samples), "seqlen": int(seqlen),
                                        "batch_size": int(batch_size)}
    options = {"group_size": 128, "sym": False, "device": None if device == "cpu" else device, "progress": False}
    start = time.perf_counter()
    if mode == "stream":
        from minquant.api import quantize_streamed

        _, report = quantize_streamed(src, out, method, overwrite=True, **calib, **options)
    else:
        from minquant.models import load_model

        model, _ = load_model(src)
        minquant.quantize(model, method, **calib, **options)
        report = dict(model.quantization_report)
        minquant.save(model, out, overwrite=True)
    report = {k: v for k, v in report.items() if k not in ("layers", "alphas", "read_seconds")}
    record = {"mode": mode, "method": method, "seconds": time.perf_counter() - start, "baseline_rss": baseline,
              "peak_rss": _status("VmHWM"), "report": report}
    if torch.cuda.is_available() and device != "cpu":
        record["cuda_peak"] = torch.cuda.max_memory_allocated()
    print(json.dumps(record, default=str))
    return record


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run_child(mode: str, method: str, src: Path, out: Path, n_samples: int, seqlen: int, device: str,
              batch_size: int = 4) -> dict:
    cmd = [sys.executable, "-m", "minquant.bench.scale", mode, method, str(src), str(out), str(n_samples), str(seqlen),
           device, str(batch_size)]
    print(f"{mode} {method} ...", flush=True)
    # the runs are compared bit for bit, so MKL is asked for results that are the same from run to run: by default
    # they may depend on how the allocator aligned the arrays (Intel's "conditional numerical reproducibility")
    env = os.environ | {"TQDM_DISABLE": "1", "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    per_block = record["report"].get("block_seconds")
    print(f"  {record['seconds']:.1f} s"
          + (f" ({sum(per_block) / len(per_block):.1f} s / block)" if per_block else "")
          + f", peak RSS {record['peak_rss'] / 1e9:.2f} GB (after imports {record['baseline_rss'] / 1e9:.2f} GB)"
          + (f", CUDA peak {record['cuda_peak'] / 1e9:.2f} GB" if "cuda_peak" in record else ""), flush=True)
    return record


def identical(a: Path, b: Path) -> dict:
    """Are two checkpoints' tensors the same, name for name, bit for bit? (and how many tensors, how many differ)"""
    from minquant.checkpoint import read_safetensors

    ta, _ = read_safetensors(a)
    tb, _ = read_safetensors(b)
    differ = sorted(k for k in set(ta) & set(tb) if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]))
    return {"identical": set(ta) == set(tb) and not differ, "tensors": len(ta), "differ": differ[:5],
            "only_in_one": sorted(set(ta) ^ set(tb))[:5],
            "config_equal": json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())}


def run(out: Path | None = None, shape: str | None = None, dtype: str | None = None, device: str = "cpu",
        methods=("rtn", "gptq"), compare: bool | None = None, n_samples: int | None = None, seqlen: int = 512,
        blocks: int | None = None, tokenizer: str | None = None, work: Path | None = None) -> Path:
    """Make the model (once; kept in `work`), quantize it streamed (and in memory, `compare`), save the figures
    after each method (a run cut short keeps the methods it finished). `blocks`: only the first N blocks of the
    shape, whose streamed peak is the whole model's (one block is held at a time) and whose time per block,
    times the shape's block count, estimates the whole (`table` says which figures are measured)."""
    from minquant.bench.results import RESULTS_DIR, save_results
    from minquant.cache import cache_root

    default_shape = "cpu-3gb" if device == "cpu" else "llama-3-8b"
    shape = shape or default_shape
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: one of {', '.join(SHAPES)}")
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    compare = device == "cpu" if compare is None else compare
    n_samples = n_samples or (32 if device == "cpu" else 128)
    work = Path(work or (cache_root() or Path("/tmp")) / "scale")
    src = work / (f"{shape}-{dtype}" + (f"-{blocks}blocks" if blocks else ""))
    made = None
    if not (src / "config.json").is_file():
        print(f"writing a random {shape} model ({dtype}{f', {blocks} blocks' if blocks else ''}) to {src} ...", flush=True)
        start = time.perf_counter()
        make_model(src, shape, dtype, blocks=blocks, tokenizer=tokenizer or "smollm2-135m",
                   device=device if device != "cpu" and torch.cuda.is_available() else "cpu")
        made = time.perf_counter() - start
        print(f"  {made:.0f} s", flush=True)
    sizes = model_bytes(src)
    full = SHAPES[shape]["num_hidden_layers"]  # a cut model's whole: its blocks are all the same size
    sizes["shape_model"] = sizes["model"] + (full - sizes["blocks"]) * sizes["largest_block"]
    results = {"model": {"shape": shape, "dtype": dtype, **sizes, "shape_blocks": full, "make_seconds": made}}
    gpu = torch.cuda.get_device_name() if device != "cpu" and torch.cuda.is_available() else None
    name = "scale_" + (re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") if gpu else "cpu")
    if shape != default_shape:
        name += "_" + re.sub(r"[^a-z0-9]+", "_", shape)
    protocol = {"calibration": f"C4, {n_samples} x {seqlen} tokens (GPTQ, AWQ), 4 windows per batch",
                "grid": "W4 g128 asymmetric",
                "gptq": "act-order, static groups (the defaults); streamed without replay", "device": device,
                "peak": "VmHWM of a fresh process per run (imports included); baseline_rss: VmRSS after imports"
                        + (" and the CUDA context" if device != "cpu" else "")}
    path = out or RESULTS_DIR / f"{name}.json"
    for method in methods:
        row = {"stream": run_child("stream", method, src, work / f"out-stream-{method}", n_samples, seqlen, device)}
        if compare:
            row["memory"] = run_child("memory", method, src, work / f"out-memory-{method}", n_samples, seqlen, device)
            row["bit_for_bit"] = identical(work / f"out-stream-{method}", work / f"out-memory-{method}")
            print(f"  streamed == in memory: {row['bit_for_bit']['identical']}", flush=True)
        else:  # nothing reads them again: the disk of a GPU machine holds the models, not every output
            row["stream"]["output_bytes"] = sum(f.stat().st_size for f in (work / f"out-stream-{method}").iterdir())
            shutil.rmtree(work / f"out-stream-{method}")
        row["target"] = _target(row["stream"], sizes)
        results[method] = row
        save_results(name, protocol, results, path)
    return path


def _target(record: dict, sizes: dict) -> dict:
    """The issue's targets for a streamed run: below half the (whole shape's) model; and block + embedding +
    activations, +20%."""
    hidden = 2 * record["report"].get("hidden_states_bytes", 0)  # a block's inputs and its outputs
    budget = 1.2 * (sizes["largest_block"] + sizes["embeddings"] + hidden)
    above = record["peak_rss"] - record["baseline_rss"]
    half = sizes.get("shape_model", sizes["model"]) / 2
    return {"half_model": half, "below_half": record["peak_rss"] < half,
            "budget_above_baseline": budget, "peak_above_baseline": above, "within_budget": above <= budget}


def table(record: dict) -> str:
    """Markdown: per method and path, seconds and peak memory (CUDA's too on a GPU); the targets; bit-for-bit
    equality; for a model cut to its first blocks, the whole shape's time estimated from the measured blocks."""
    r, m = record["results"], record["results"]["model"]
    methods = [k for k in r if k != "model"]
    cuda = any("cuda_peak" in r[k][p] for k in methods for p in ("stream", "memory") if p in r[k])
    lines = [f"A random {m['shape']} Llama, {m['dtype']}, {m['model'] / 1e9:.2f} GB in shards ({m['blocks']} blocks of "
             f"{m['largest_block'] / 1e6:.0f} MB, embeddings {m['embeddings'] / 1e6:.0f} MB); {record['protocol']['calibration']}, "
             f"{record['protocol']['grid']}; {record['machine']['cpu']}, {record['machine']['cores']} cores"
             + (f", {record['machine']['gpu']}" if record['machine'].get('gpu') else "") + ".", "",
             "| method | path | seconds | s / block | peak RSS | above imports | " + ("CUDA peak | " if cuda else "")
             + "target (block + embeddings + activations, +20%) | below half the model | bit for bit |",
             "|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---|---|"]
    for method in methods:
        row = r[method]
        for path in ("stream", "memory"):
            if path not in row:
                continue
            run = row[path]
            per_block = run["report"].get("block_seconds") or []
            t = row["target"] if path == "stream" else None
            lines.append(
                f"| {method.upper()} | {'streamed' if path == 'stream' else 'in memory'} | {run['seconds']:.0f} | "
                + (f"{sum(per_block) / len(per_block):.1f}" if per_block else "-") + f" | {run['peak_rss'] / 1e9:.2f} GB | "
                f"{(run['peak_rss'] - run['baseline_rss']) / 1e9:.2f} GB | "
                + (f"{run['cuda_peak'] / 1e9:.2f} GB | " if "cuda_peak" in run else "- | " if cuda else "")
                + (f"{t['budget_above_baseline'] / 1e9:.2f} GB ({'met' if t['within_budget'] else 'missed'})" if t else "-")
                + " | " + ("yes" if run["peak_rss"] < m.get("shape_model", m["model"]) / 2 else "no")
                + " | " + ({True: "identical", False: "differ"}[row["bit_for_bit"]["identical"]]
                           if "bit_for_bit" in row and path == "stream" else "") + " |")
    full = m.get("shape_blocks", m["blocks"])
    for method in (k for k in methods if full > m["blocks"]):
        run = r[method]["stream"]
        per_block = run["report"].get("block_seconds") or []
        if per_block:
            mean = sum(per_block) / len(per_block)
            estimate = run["seconds"] + (full - m["blocks"]) * mean
            lines.append(f"\n{method.upper()} on all {full} blocks of {m['shape']}, estimated (not measured): "
                         f"{estimate / 60:.0f} min (the {run['seconds']:.0f} s measured on {m['blocks']} blocks, plus "
                         f"{full - m['blocks']} more at their mean {mean:.1f} s); its peak memory is the one measured, "
                         "since one block is held at a time and every block is the same size (the whole model: "
                         f"{m['shape_model'] / 1e9:.1f} GB, whose half the table's \"below half\" compares with).")
    return "\n".join(lines)


if __name__ == "__main__":
    child(sys.argv[1:])
