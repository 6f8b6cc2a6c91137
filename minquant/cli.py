"""The `minquant` command. Each subcommand is a thin layer over a library function.

    minquant memory meta-llama/Llama-2-70b-hf     # bytes per format, GPUs needed, decode bound
    minquant memory smollm2-135m --group-size 64 --linears-only
    minquant quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out smollm2-w4g64
    minquant bench rtn                            # RTN perplexity table -> data/results/
    minquant demo                                 # what `make demo` runs
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from minquant import memory

DEMO_PROMPT = "Explain in one sentence why a 70B-parameter model does not fit on one 24 GB GPU."


def cmd_memory(args: argparse.Namespace) -> None:
    from minquant.models import load_config

    cfg = load_config(args.model)
    print(memory.memory_table(cfg, args.model, group_size=args.group_size, context=args.context,
                              batch=args.batch, linears_only=args.linears_only))


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from minquant.models import load_config, load_model

    for name, group_size in (("smollm2-135m", 64), ("meta-llama/Llama-2-70b-hf", 128)):
        print(memory.memory_table(load_config(name), name, group_size=group_size), end="\n\n")

    print(f"Generating from smollm2-135m (fp32, greedy, {args.max_new_tokens} new tokens)...")
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    print(f"\nprompt: {args.prompt}")
    print(f"smollm2-135m fp32: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}")
    print(f"\n(load and generate: {time.perf_counter() - start:.1f} s)")


def cmd_quantize(args: argparse.Namespace) -> None:
    import minquant
    from minquant.checkpoint import save_quantized
    from minquant.models import load_model

    print(f"loading {args.model} ...")
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    minquant.quantize(model, args.method, tokenizer=tokenizer, bits=args.bits, group_size=args.group_size,
                      sym=args.sym, full_range=args.full_range, act_order=args.act_order,
                      static_groups=args.static_groups, search_range=args.search_range, damp=args.damp,
                      true_sequential=not args.no_true_sequential, duo_scaling=args.duo_scaling, clip=not args.no_clip,
                      bits_budget=args.bits_budget,
                      calib=args.calib, n_samples=args.n_samples, seqlen=args.seqlen, seed=args.seed, device=args.device)
    seconds = time.perf_counter() - start
    out = save_quantized(model, tokenizer, args.out)
    if args.method == "awq":  # the scales and clips, to re-apply to the float model (minquant.awq.apply_awq)
        model.awq_search.save(out / "awq_search.safetensors")
    if args.bits_budget is not None:  # which config each layer got
        plan = model.mixed_plan
        plan.save(out / "mixed_plan.json")
        print(f"mixed precision: {plan.bits_per_weight:.3f} bits per weight (budget {args.bits_budget}); layers per config: "
              + ", ".join(f"{label} {n}" for label, n in plan.counts().items()))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    scheme = f"mixed {model.mixed_plan.bits_per_weight:.2f} bits/weight" if args.bits_budget is not None else f"W{args.bits} g{args.group_size}"
    print(f"\n{args.method.upper()} {scheme}{' sym' if args.sym else ''}"
          f"{' act-order' if args.act_order else ''}: quantized in {seconds:.1f} s; "
          f"saved {out} ({size / 1e6:.1f} MB of weights)")
    if args.eval_windows:
        from minquant.eval import perplexity

        r = perplexity(model.float(), tokenizer, "wikitext2", max_windows=args.eval_windows)
        print(f"WikiText-2 test perplexity ({r.windows} windows of {r.seqlen}): {r.ppl:.3f}")


# `minquant bench WHICH`: the module and function that measure, and the results file they write
SWEEPS = {"gptq": ("minquant.bench_gptq", "bench_gptq", "gptq_smollm2"),
          "awq": ("minquant.bench_awq", "bench_awq", "awq_smollm2"),
          "mixed": ("minquant.bench_mixed", "bench_mixed", "mixed_smollm2"),
          "calibration": ("minquant.bench_mixed", "bench_calibration", "calibration_smollm2")}
BENCHES = {"sensitivity": ("minquant.bench_mixed", "bench_sensitivity", "sensitivity_smollm2"),
           "eightbit": ("minquant.bench_mixed", "bench_eightbit", "eightbit"),
           "claims": ("minquant.bench_mixed", "bench_claims", "claims"),
           "packing": ("minquant.bench", "bench_packing", "packing_smollm2")}


def cmd_bench(args: argparse.Namespace) -> None:
    from minquant import bench

    if args.which == "readme":
        bench.update_readme()
        print(f"updated the results tables in {bench.README}")
        return
    if args.which == "kernels":
        from minquant.kernels.benchmark import bench_kernels

        print(f"saved {bench_kernels()}")
        return
    if args.which in SWEEPS or args.which in BENCHES:  # resumable sweeps take --only/--redo
        module, func, results = SWEEPS.get(args.which) or BENCHES[args.which]
        run = getattr(importlib.import_module(module), func)
        path = run(only=args.only, redo=args.redo) if args.which in SWEEPS else run()
        print(f"saved {path}\n\n{bench.TABLES[results](bench.load_results(results))}")
        return
    path = bench.bench_rtn(max_windows=args.max_windows or None, seqlen=args.seqlen, device=args.device)
    print(f"saved {path}\n\n{bench.rtn_table(bench.load_results('rtn_smollm2'))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("memory", help="bytes of a model in each format, and the GPUs that hold it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  minquant memory meta-llama/Llama-2-70b-hf\n"
                           "  minquant memory smollm2-135m --group-size 64 --linears-only\n"
                           "  minquant memory ./my-model-folder --context 32768 --batch 8"))
    p.add_argument("model", help="packaged name (smollm2-135m), local folder, or Hugging Face id")
    p.add_argument("--group-size", type=int, default=128, help="group size of integer formats, -1 = per channel")
    p.add_argument("--context", type=int, default=4096, help="tokens held in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--linears-only", action="store_true", help="keep embeddings and lm_head in fp16")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ or AWQ) and save a GPTQ checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  minquant quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out smollm2-gptq\n"
                           "  minquant quantize smollm2-135m --method rtn --bits 8 --group-size -1 --out smollm2-w8\n"
                           "  minquant quantize smollm2-135m --method awq --bits 4 --group-size 64 --out smollm2-awq\n"
                           "  minquant quantize meta-llama/Llama-3.2-1B --bits 4 --act-order --device cuda --out llama-gptq\n"
                           "  minquant quantize smollm2-135m --bits 3 --group-size 64 --eval-windows 16 --out w3\n"
                           "  minquant quantize smollm2-135m --bits-budget 3.5 --group-size 64 --out smollm2-mixed"))
    p.add_argument("model", help="packaged name (smollm2-135m), local folder, or Hugging Face id")
    p.add_argument("--out", required=True, help="folder to write the checkpoint to")
    p.add_argument("--method", choices=["gptq", "rtn", "awq"], default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric (zero-point fixed at 2**(bits-1))")
    p.add_argument("--full-range", action="store_true", help="with --sym: all 2**bits levels (GPTQ's symmetric grid)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--static-groups", action="store_true", help="GPTQ with act-order: group ranges fixed up front")
    p.add_argument("--search-range", action="store_true", help="GPTQ: each group's range narrowed to round it best")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="GPTQ: calibrate all of a block's linears on its float inputs (faster; llm-compressor's way)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, fraction of H's mean diagonal")
    p.add_argument("--duo-scaling", action="store_true", help="AWQ: scales from activations and weights")
    p.add_argument("--no-clip", action="store_true", help="AWQ: no range-shrink search")
    p.add_argument("--bits-budget", type=float, default=None, metavar="BPW",
                   help="GPTQ mixed precision: bits and group size per layer at <= BPW bits per weight "
                        "(scales and zeros counted), chosen by measured sensitivity; e.g. 3.5")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext2"], help="calibration text")
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where each block is quantized (cuda, cpu); default: the model's")
    p.add_argument("--eval-windows", type=int, default=0, help="also score N WikiText-2 test windows of 2048 tokens")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="measure and save numbers to data/results/",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "examples:\n  minquant bench rtn                  # quick CPU protocol: 16 windows\n"
                           "  minquant bench rtn --max-windows 0 --device cuda   # the full test set\n"
                           "  minquant bench gptq --only 'fp32' '*W4 g64 sym*'   # part of the GPTQ sweep\n"
                           "  minquant bench sensitivity          # per-layer proxies vs measured loss (~30 min)\n"
                           "  minquant bench mixed --only 'mixed 3.297*'   # mixed precision at uniform W3 g64's bytes\n"
                           "  minquant bench readme               # README tables from data/results/"))
    p.add_argument("which", choices=["rtn", "gptq", "awq", "sensitivity", "mixed", "calibration", "eightbit", "claims", "packing", "kernels",
                                          "readme"],
                   help="rtn: RTN on SmolLM2 (perplexity) and MiniLM (cosine); gptq: GPTQ vs RTN vs llm-compressor on "
                        "SmolLM2; awq: AWQ vs llm-compressor's AWQ on SmolLM2; sensitivity: per-layer proxies vs "
                        "measured loss; mixed: mixed-precision GPTQ vs uniform; calibration: GPTQ/AWQ by calibration data; eightbit: int8 and fp8 weights; claims: the course's claims vs our numbers; packing: bytes on disk; "
                        "kernels: the W4A16 kernel on a GPU; readme: README tables from data/results/")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="gptq/awq/mixed/calibration: run only the entries whose label matches "
                   "(e.g. 'GPTQ W4 g64*' 'fp32'); entries already saved are skipped")
    p.add_argument("--redo", action="store_true", help="gptq/awq/mixed/calibration: measure selected entries again even if saved")
    p.add_argument("--max-windows", type=int, default=16, help="WikiText-2 windows to score; 0 = all")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the memory table and a generation from the packaged SmolLM2",
                       epilog="example:\n  minquant demo --max-new-tokens 40",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, OSError, RuntimeError) as e:
        print(f"minquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
