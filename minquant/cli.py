"""The `minquant` command: the front door (`minquant.quantize/save/load/evaluate/memory`) in a shell.

    minquant quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out smollm2-w4g64
    minquant eval smollm2-w4g64 --max-windows 4     # perplexity of a checkpoint, a name or a folder
    minquant generate smollm2-w4g64 --prompt "Why quantize?"
    minquant memory meta-llama/Llama-2-70b-hf      # bytes per format, GPUs needed, decode bound
    minquant bench rtn                             # measure; results -> data/results/
    minquant demo                                  # what `make demo` runs (notebook 10)

Each subcommand is a thin layer over a library function and ends with a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minquant import memory
from minquant.compare import DEMO_PROMPT


def load_any(name: str, dtype=None, device: str = "cpu"):
    """A minquant/GPTQ checkpoint folder through `minquant.load`, anything else through `load_model`."""
    import minquant

    from minquant.atomic import recover
    from minquant.checkpoint import read_json

    recover(Path(name), clean=False)  # a checkpoint whose save was killed between its two renames
    config = Path(name) / "config.json"
    if config.is_file() and "quantization_config" in read_json(config):
        return minquant.load(name, dtype=dtype, device=device)
    import torch

    model, _ = minquant.load_model(name, dtype=dtype or torch.float32, device=device)
    return model


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of tokens, windows, samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def group_size_arg(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or not (value == -1 or value >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive group size or -1 (per channel), got {text!r}")
    return value


def _dtype(name: str | None):
    import torch

    return {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cmd_memory(args: argparse.Namespace) -> None:
    from minquant.models import load_config

    cfg = load_config(args.model)
    print(memory.memory_table(cfg, args.model, group_size=args.group_size, context=args.context,
                              batch=args.batch, linears_only=args.linears_only))


def cmd_demo(args: argparse.Namespace) -> None:
    from minquant.compare import demo

    record = demo(args.model, args.out, methods=args.methods, bits=args.bits, group_size=args.group_size,
                  n_samples=args.n_samples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                  prompt=args.prompt, max_new_tokens=args.max_new_tokens, device=args.device,
                  progress=not args.quiet)
    (Path(args.out) / "demo_results.json").write_text(json.dumps(record, indent=2) + "\n")


def cmd_quantize(args: argparse.Namespace) -> None:
    import minquant
    from minquant.api import check_device
    from minquant.atomic import check_destination
    from minquant.checkpoint import disk_bytes

    check_destination(args.out, args.overwrite)  # before the long work, not after it
    check_device(args.device)
    if not args.stream:
        print(f"loading {args.model} ...", flush=True)
        model = load_any(args.model)
    start = time.perf_counter()
    from minquant.api import reads_calibration

    data = {"calib": args.calib, "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": args.seed} \
        if reads_calibration(args.method, args.smoothquant, args.activations) else {}  # RTN, fp4, dynamic W8A8: none
    # only the options given: quantize names any that the method does not have
    flags = {"search_range": args.search_range, "duo_scaling": args.duo_scaling}
    options = {k: True for k, given in flags.items() if given}
    options |= {k: v for k, v in (("act_order", args.act_order), ("static_groups", args.static_groups)) if v is not None}
    options |= {"clip": False} if args.no_clip else {}
    options |= {"true_sequential": False} if args.no_true_sequential else {}
    options |= {"damp": args.damp} if args.damp is not None else {}
    options |= {k: v for k, v in (("activations", args.activations), ("alpha", args.alpha)) if v is not None}
    options |= {"smoothquant": True} if args.smoothquant else {}
    if args.stream:  # never the whole float model in memory: block by block from its shards to the output's
        from minquant.api import quantize_streamed

        out, report = quantize_streamed(args.model, args.out, args.method, bits=args.bits, group_size=args.group_size,
                                        sym=args.sym, full_range=args.full_range, bits_budget=args.bits_budget,
                                        device=args.device, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                                        **data, **options)
        print(f"\nstreamed {report['method'].upper()} W{args.bits} g{args.group_size}: {report['seconds_total']:.1f} s; "
              f"saved {out} ({disk_bytes(out) / 1e6:.1f} MB of weights in {len(report['shards'])} shard(s))")
        if args.eval_windows:
            r = minquant.evaluate(minquant.load(out), "wikitext2", max_windows=args.eval_windows)
            print(f"WikiText-2 test perplexity ({r.windows} windows of {r.seqlen}): {r.ppl:.3f}")
        return
    minquant.quantize(model, args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                      full_range=args.full_range, bits_budget=args.bits_budget, device=args.device, **data, **options)
    seconds = time.perf_counter() - start
    out = minquant.save(model, args.out, overwrite=args.overwrite)
    if args.bits_budget is not None:  # which config each layer got
        plan = model.mixed_plan
        print(f"mixed precision: {plan.bits_per_weight:.3f} bits per weight (budget {args.bits_budget}); layers per config: "
              + ", ".join(f"{label} {n}" for label, n in plan.counts().items()))
    size = disk_bytes(out)
    from minquant.quant import scheme_label

    if args.method in ("w8a8", "smoothquant", "fp8"):  # notebook 11: 8-bit weights and activations
        label = (f"{'SmoothQuant ' if args.method == 'smoothquant' or args.smoothquant else ''}W8A8 "
                 f"{'fp8' if args.method == 'fp8' else 'int8'}, {args.activations or 'dynamic'} activations")
    elif args.method in ("mxfp4", "nvfp4"):
        label = f"{args.method.upper()} weights"
    else:
        scheme = (f"mixed {model.mixed_plan.bits_per_weight:.2f} bits/weight" if args.bits_budget is not None
                  else scheme_label(args.bits, args.group_size))
        label = (f"{args.method.upper()} {scheme}{' sym' if args.sym else ''}"
                 f"{' act-order' if args.method == 'gptq' and args.act_order is not False else ''}")
    print(f"\n{label}: quantized in {seconds:.1f} s; saved {out} ({size / 1e6:.1f} MB of weights)")
    if args.eval_windows:
        r = minquant.evaluate(model.float(), "wikitext2", max_windows=args.eval_windows)
        print(f"WikiText-2 test perplexity ({r.windows} windows of {r.seqlen}): {r.ppl:.3f}")


def cmd_eval(args: argparse.Namespace) -> None:
    import minquant
    from minquant.memory import module_bytes

    from minquant.api import check_device

    check_device(args.device)
    data = Path(args.text).read_text() if args.text else "wikitext2"
    model = load_any(args.model, _dtype(args.dtype), args.device)
    start = time.perf_counter()
    r = minquant.evaluate(model, data, seqlen=args.seqlen, max_windows=args.max_windows or None)
    print(f"{args.model}: perplexity {r.ppl:.3f} on {r.text} ({r.windows} windows of {r.seqlen} tokens, "
          f"{r.tokens:,} predicted); model {module_bytes(model) / 1e6:.1f} MB; {time.perf_counter() - start:.1f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from minquant.compare import generate

    from transformers import TextStreamer

    from minquant.api import check_device

    if not args.prompt.strip() and args.no_chat:
        raise ValueError("the prompt is empty: a plain continuation needs some text to continue (--prompt)")
    check_device(args.device)
    model = load_any(args.model, _dtype(args.dtype), args.device)
    print(f"prompt: {args.prompt}\n{args.model}: ", end="", flush=True)
    start = time.perf_counter()
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)  # tokens as they come
    text = generate(model, model.tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat, streamer=streamer)
    seconds = time.perf_counter() - start
    n = len(model.tokenizer(text, add_special_tokens=False).input_ids)
    print(f"\n({n} tokens in {seconds:.1f} s, greedy)")


def cmd_bench(args: argparse.Namespace) -> None:
    from minquant.bench import registry

    if args.which == "readme":
        registry.update_readme()
        print(f"updated the results tables in {registry.results.README}")
        return
    options = {k: getattr(args, k) for k in ("only", "redo", "max_windows", "seqlen", "model", "n_samples", "device",
                                             "shape", "methods", "blocks", "tokenizer")}
    path = registry.run(args.which, **options)
    print(f"saved {path}\n\n{registry.table(path.stem)}")


def _subcommand(sub, func, help: str, examples: list[str]) -> argparse.ArgumentParser:
    """The subcommand that `func` (cmd_NAME) runs, whose --help ends with worked examples."""
    p = sub.add_parser(func.__name__.removeprefix("cmd_"), help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.set_defaults(func=func)
    return p


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: fp32 (fp16 for checkpoints on a GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _subcommand(sub, cmd_memory, "bytes of a model in each format, and the GPUs that hold it", [
        'minquant memory meta-llama/Llama-2-70b-hf',
        'minquant memory smollm2-135m --group-size 64 --linears-only',
        'minquant memory ./my-model-folder --context 32768 --batch 8'])
    p.add_argument("model", help="packaged name (smollm2-135m), local folder, or Hugging Face id")
    p.add_argument("--group-size", type=group_size_arg, default=None,
                   help="group size of integer formats, -1 = per channel (default: 128, or 64/32 where 128 does not divide)")
    p.add_argument("--context", type=positive_int, default=4096, help="tokens held in the KV cache")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded at once")
    p.add_argument("--linears-only", action="store_true", help="keep embeddings and lm_head in fp16")

    p = _subcommand(sub, cmd_quantize, "quantize a model (RTN, GPTQ, AWQ: a GPTQ checkpoint; W8A8, SmoothQuant, FP8, "
                    "MXFP4, NVFP4: a compressed-tensors one) and save it", [
        'minquant quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out smollm2-gptq',
        'minquant quantize smollm2-135m --method rtn --bits 8 --group-size -1 --out smollm2-w8',
        'minquant quantize smollm2-135m --method awq --bits 4 --group-size 64 --out smollm2-awq',
        'minquant quantize meta-llama/Llama-3.2-1B --bits 4 --device cuda --out llama-gptq',
        'minquant quantize meta-llama/Llama-3.1-70B --stream --device cuda --out llama70b-gptq  # bigger than memory',
        'minquant quantize smollm2-135m --no-act-order --group-size 64 --out smollm2-plain-gptq',
        'minquant quantize smollm2-135m --bits 3 --group-size 64 --eval-windows 16 --out w3',
        'minquant quantize smollm2-135m --bits-budget 3.5 --group-size 64 --out smollm2-mixed',
        'minquant quantize smollm2-135m --method smoothquant --out smollm2-w8a8       # int8 weights and activations',
        'minquant quantize smollm2-135m --method smoothquant --activations static --out smollm2-w8a8-static',
        'minquant quantize smollm2-135m --method fp8 --out smollm2-fp8                # FP8 W8A8, dynamic',
        'minquant quantize smollm2-135m --method nvfp4 --out smollm2-nvfp4            # 4-bit float weights'])
    p.add_argument("model", help="packaged name (smollm2-135m), local folder, or Hugging Face id")
    p.add_argument("--out", required=True, help="folder to write the checkpoint to (replaced whole, atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a non-empty folder that holds no minquant checkpoint")
    p.add_argument("--method", choices=["gptq", "rtn", "awq", "w8a8", "smoothquant", "fp8", "mxfp4", "nvfp4"], default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=group_size_arg, default=128, help="-1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric (zero-point fixed at 2**(bits-1))")
    p.add_argument("--full-range", action="store_true", help="with --sym: all 2**bits levels (GPTQ's symmetric grid)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing Hessian diagonal (desc_act); on by default, the best measured here")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ with act-order: group ranges fixed up front (on by default with act-order)")
    p.add_argument("--search-range", action="store_true", help="GPTQ: each group's range narrowed to round it best")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="GPTQ: calibrate all of a block's linears on its float inputs (faster; llm-compressor's way)")
    p.add_argument("--damp", type=float, default=None, help="GPTQ: damping, fraction of H's mean diagonal (default 0.01)")
    p.add_argument("--duo-scaling", action="store_true", help="AWQ: scales from activations and weights")
    p.add_argument("--no-clip", action="store_true", help="AWQ: no range-shrink search")
    p.add_argument("--activations", choices=["dynamic", "static"], default=None,
                   help="w8a8/smoothquant/fp8: activation scales per token at run time (default), or one per tensor "
                        "from calibration")
    p.add_argument("--alpha", type=float, default=None, help="smoothquant: migration strength in [0, 1] (default: searched)")
    p.add_argument("--smoothquant", action="store_true", help="fp8: smooth the activations first (SmoothQuant)")
    p.add_argument("--bits-budget", type=float, default=None, metavar="BPW",
                   help="GPTQ mixed precision: bits and group size per layer at <= BPW bits per weight "
                        "(scales and zeros counted), chosen by measured sensitivity; e.g. 3.5")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext2"], help="calibration text")
    p.add_argument("--n-samples", type=positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive_int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where each block is quantized (cuda, cpu); default: the model's")
    p.add_argument("--eval-windows", type=non_negative_int, default=0, help="also score N WikiText-2 test windows of 2048 tokens")
    p.add_argument("--stream", action="store_true", help="rtn/gptq/awq on a safetensors model bigger than memory: one block "
                   "at a time from its shards, written shard by shard (same tensors, bit for bit)")
    p.add_argument("--max-shard-size", default="2GB", help="with --stream: the largest output shard (e.g. 5GB, 500MB)")

    p = _subcommand(sub, cmd_bench, "measure and save numbers to data/results/", [
        'minquant bench rtn                  # quick CPU protocol: 16 windows',
        'minquant bench rtn --max-windows 0 --device cuda   # the full test set',
        "minquant bench gptq --only 'fp32' '*W4 g64 sym*'   # part of the GPTQ sweep",
        'minquant bench sensitivity          # per-layer proxies vs measured loss (~30 min)',
        "minquant bench mixed --only 'mixed 3.297*'   # mixed precision at uniform W3 g64's bytes",
        'minquant bench readme               # README tables from data/results/',
        'minquant bench paper --model facebook/opt-125m --device cuda   # GPTQ paper, Table 3 row',
        'minquant bench paper --model meta-llama/Llama-3.2-1B --device cuda   # same recipe, our numbers',
        "minquant bench demo                 # the demo's numbers -> data/results/demo_smollm2.json",
        "minquant bench sass                 # the GEMV's SASS per weight, sm_80/sm_90, no GPU needed",
        "minquant bench cpu                  # 4-bit layers and decoding on this CPU (~10 min)",
        "minquant bench scale                # a 3.3 GB model streamed on this CPU, peak memory (~12 min)",
        "minquant bench scale --shape llama-3-70b --blocks 2 --device cuda --methods gptq   # 70B's blocks on a GPU"])
    from minquant.bench.registry import BENCHMARKS

    p.add_argument("which", choices=[*BENCHMARKS, "readme"], help="; ".join(
        [f"{name}: {b.about}" for name, b in BENCHMARKS.items()] + ["readme: README tables from data/results/"]))
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="gptq/awq/mixed/calibration: run only the entries whose label matches "
                   "(e.g. 'GPTQ W4 g64*' 'fp32'); entries already saved are skipped")
    p.add_argument("--redo", action="store_true", help="gptq/awq/mixed/calibration: measure selected entries again even if saved")
    p.add_argument("--max-windows", type=int, default=None,
                   help="WikiText-2 windows to score; 0 = all (default: rtn 16, paper all, demo 4)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: rtn 2048, paper the model's)")
    p.add_argument("--model", default=None, help="paper: Hub id or folder (default facebook/opt-125m); demo: the model")
    p.add_argument("--n-samples", type=int, default=None, help="paper: C4 calibration windows (default 128)")
    p.add_argument("--device", default=None, help="rtn: cpu (default) or cuda; paper: default cuda when there is one")
    p.add_argument("--shape", default=None, help="scale: the random Llama's shape (cpu-3gb, llama-3-8b, llama-3-70b, ci)")
    p.add_argument("--blocks", type=positive_int, default=None, help="scale: only the shape's first N decoder blocks "
                   "(the whole shape's time is then estimated from theirs)")
    p.add_argument("--tokenizer", default=None, help="scale: a folder with SmolLM2's tokenizer, on a machine without "
                   "the packaged model (make gpu-kit)")
    p.add_argument("--methods", nargs="+", default=None, choices=["rtn", "gptq", "awq"], help="scale: methods to run")

    p = _subcommand(sub, cmd_demo, "RTN vs GPTQ vs AWQ on the packaged SmolLM2: one table, save, reload, generate", [
        'minquant demo                       # ~6 min on 2 CPU cores (make demo)',
        'minquant demo --methods rtn awq --eval-windows 2 --out /tmp/demo',
        'minquant demo --model Qwen/Qwen2.5-0.5B --group-size 128 --device cuda'])
    p.add_argument("--model", default="smollm2-135m", help="packaged name, local folder or Hugging Face id")
    p.add_argument("--out", default="minquant-demo", help="folder for the best checkpoint and demo_results.json")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"], choices=["rtn", "gptq", "awq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="64: SmolLM2's hidden 576 is no multiple of 128")
    p.add_argument("--n-samples", type=int, default=32, help="C4 calibration windows (GPTQ, AWQ)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--eval-windows", type=int, default=4, help="WikiText-2 test windows of 2048 tokens to score")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default=None, help="where blocks are quantized (cuda, cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = _subcommand(sub, cmd_eval, "perplexity of a model or checkpoint (GPTQ protocol, WikiText-2 test)", [
        'minquant eval smollm2-135m --max-windows 4',
        'minquant eval ./smollm2-gptq --max-windows 16      # a checkpoint from minquant quantize',
        'minquant eval ./llama-gptq --max-windows 0 --device cuda --dtype fp16   # the whole test set',
        'minquant eval smollm2-135m --text my_corpus.txt --seqlen 512'])
    p.add_argument("model", help="checkpoint folder, packaged name, local folder or Hugging Face id")
    p.add_argument("--max-windows", type=non_negative_int, default=16, help="score only the first N windows; 0 = all")
    p.add_argument("--seqlen", type=positive_int, default=None, help="tokens per window (default: the model's, at most 2048)")
    p.add_argument("--text", default=None, help="score this text file instead of WikiText-2 test")
    _add_placement(p)

    p = _subcommand(sub, cmd_generate, "greedy text from a model or checkpoint", [
        'minquant generate smollm2-135m --prompt "What is quantization?"',
        'minquant generate ./smollm2-gptq --max-new-tokens 64',
        'minquant generate ./smollm2-gptq --no-chat --prompt "The capital of France is"'])
    p.add_argument("model", help="checkpoint folder, packaged name, local folder or Hugging Face id")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--no-chat", action="store_true", help="plain continuation, no chat template")
    _add_placement(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, OSError, RuntimeError) as e:
        print(f"minquant {args.command}: error: {e}", file=sys.stderr)  # one line, no traceback
        return 2
    except KeyboardInterrupt:
        print(f"\nminquant {args.command}: interrupted (a checkpoint being saved is left as it was)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
