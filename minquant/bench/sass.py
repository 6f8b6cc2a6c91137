"""Read what a Triton kernel becomes on an NVIDIA GPU, without a GPU: compile it here, count its SASS.

Triton compiles for any NVIDIA architecture on a CPU-only machine (ptxas ships in its wheel), and
cuobjdump/nvdisasm turn the binary into SASS, the instructions the GPU really runs. That makes the
properties that decide a memory-bound kernel's speed checkable in CI: how wide its global loads
are (LDG.E.128 moves 16 bytes per lane), whether it converts integers to floats (I2F, a quarter-
rate instruction), whether registers spill to local memory (STL/LDL), and how many instructions
its main loop spends per weight (the GPU issues about 4 per weight in the time memory delivers one).

The compile mimics the JIT's specialisation on a real call: pointers and integers divisible by 16
are marked so (it then emits vector loads) and integers equal to 1 become constants.
`compile_gemv`/`compile_tc` compile minquant's kernels as a call of that shape would; `run` is
`minquant bench sass` (data/results/sass_kernels.json, the README's SASS table).
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from minquant.bench.results import save_results
from minquant.kernels import triton_gemv, triton_tc
from minquant.kernels.triton_w4a16 import SKINNY_CONFIGS, w4a16_kernel

NAME = "sass_kernels"


def compile_for_gpu(kernel, args: dict, constexprs: dict, capability: int = 90, num_warps: int = 4,
                    num_stages: int = 1):
    """Compile a @triton.jit kernel for sm_<capability>. args: name -> "*fp16"-style pointer type, or an
    int (a typical value: the JIT specialises on divisibility by 16 and on == 1)."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):      # a pointer: torch allocations are 16-byte aligned
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif value == 1:                # the JIT turns integer arguments equal to 1 into constants
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump(compiled, *flags: str) -> str:
    import subprocess
    import tempfile

    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        run = subprocess.run([path_to_cuobjdump(), *flags, f.name], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed: {run.stderr.strip()}")
    return run.stdout


def sass_of(compiled) -> list[tuple[int, str]]:
    """The kernel's SASS as (address, instruction) pairs, predicate guards included."""
    out = []
    for line in _cuobjdump(compiled, "-sass").splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def registers_of(compiled) -> int | None:
    """Registers per thread, from cuobjdump's resource usage (a real GPU would report it at load)."""
    m = re.search(r"REG:(\d+)", _cuobjdump(compiled, "-res-usage"))
    return int(m.group(1)) if m else None


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def main_loop(sass: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    best = None
    for addr, ins in sass:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    return [ins for addr, ins in sass if best and best[0] <= addr <= best[1]]


@dataclass
class SassReport:
    loop_instructions: int
    weights_per_thread_per_iteration: int
    opcodes: dict                 # opcode -> count, in the main loop
    loads: dict                   # global load opcode (LDG.E.128, LDG.E.EF.128, ...) -> count, whole kernel
    converts: dict                # I2F / I2FP / F2I ... -> count, whole kernel
    spills: int                   # STL + LDL instructions, whole kernel
    registers: int | None

    @property
    def per_weight(self) -> float:
        return self.loop_instructions / self.weights_per_thread_per_iteration

    def figures(self) -> dict:
        """The numbers, for a results file."""
        return {"instructions_per_weight": self.per_weight, "loop_opcodes": self.opcodes, "loads": self.loads,
                "converts": self.converts, "spills": self.spills, "registers": self.registers,
                "summary": self.summary()}

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.opcodes.items(), key=lambda kv: -kv[1])[:6])
        return (f"{self.per_weight:.2f} SASS instructions per weight ({self.loop_instructions} in the loop for "
                f"{self.weights_per_thread_per_iteration} weights per thread: {top}); loads {self.loads}; "
                f"converts {self.converts or 'none'}; spills {self.spills}; registers {self.registers}")


def report(compiled, weights_per_thread_per_iteration: int) -> SassReport:
    sass = sass_of(compiled)
    loop = collections.Counter(opcode(ins) for ins in main_loop(sass))
    everything = collections.Counter(opcode(ins) for _, ins in sass)
    return SassReport(loop_instructions=sum(loop.values()),
                      weights_per_thread_per_iteration=weights_per_thread_per_iteration, opcodes=dict(loop),
                      loads={k: v for k, v in everything.items() if k.startswith("LDG")},
                      converts={k: v for k, v in everything.items() if re.match(r"^(I2F|I2FP|F2I|F2F|I2I)", k)},
                      spills=everything.get("STL", 0) + everything.get("LDL", 0),
                      registers=registers_of(compiled))


def compile_gemv(capability: int, M: int = 1, K: int = 8192, N: int = 8192, group_size: int = 128, dtype: str = "fp16",
                 permuted: bool = False, bias: bool = False, config=None):
    """The kernel compiled as the JIT would for such a call, for sm_<capability>, on any machine (no GPU):
    (compiled kernel, weights a thread handles per loop iteration), for `report`."""
    config = config or triton_gemv.DEFAULT_CONFIG
    a = triton_gemv.launch_args(M, K, N, group_size, config)
    args = dict(x_ptr=f"*{dtype}", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", bias_ptr="*fp16",
                perm_ptr="*i32", out_ptr=f"*{dtype}", N=N, n_chunks=a["n_chunks"], magic=triton_gemv.MAGIC,
                shift=triton_gemv.NIBBLE_SHIFT, stride_xm=K, stride_qk=N, stride_zg=N // 8, stride_sg=N, stride_om=N)
    compiled = compile_for_gpu(triton_gemv.gemv_kernel, args, {**a["constexprs"], "HAS_BIAS": bias, "PERMUTED": permuted},
                               capability=capability, num_warps=a["num_warps"])
    block_n, slots, _split, warps = config
    return compiled, slots * a["constexprs"]["CHUNK_W"] * block_n * 8 // (32 * warps)


def compile_tc(capability: int, M: int = 16, K: int = 8192, N: int = 8192, group_size: int = 128, dtype: str = "fp16",
               bias: bool = False, config=None):
    """The kernel compiled as the JIT would for such a call, for sm_<capability>, on any machine (no GPU):
    (compiled kernel, weights a thread handles per loop iteration), for `report`.
    config: the first of CONFIGS for this M by default."""
    config = config or triton_tc.first_config(M)
    a = triton_tc.launch_args(M, K, N, group_size, config)
    args = dict(x_ptr=f"*{dtype}", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", bias_ptr="*fp16",
                out_ptr=f"*{dtype}", M=M, N=N, n_chunks=a["n_chunks"], magic=triton_gemv.MAGIC,
                shift=triton_gemv.NIBBLE_SHIFT, stride_xm=K, stride_qk=N, stride_zg=N // 8, stride_sg=N, stride_om=N)
    compiled = compile_for_gpu(triton_tc.tc_kernel, args, {**a["constexprs"], "HAS_BIAS": bias, "PRECISION": "tf32"},
                               capability=capability, num_warps=a["num_warps"], num_stages=a["num_stages"])
    return compiled, config[1] * 128 // (32 * config[3])


def fused_kernel_figures(capability: int, K: int = 8192, N: int = 8192, group_size: int = 128) -> dict:
    """The fused kernel's batch-1 configuration, for comparison (the GEMV replaced it at 1-4 rows)."""
    bm, bn, bk, split, warps, stages = SKINNY_CONFIGS[0]
    ints = dict(M=2, N=N, K=K, group_k=group_size, m_bucket=2, stride_xm=K, stride_xk=1, stride_qk=N, stride_qn=1,
                stride_zg=N // 8, stride_zn=1, stride_sg=N, stride_sn=1, stride_om=N, stride_on=1)
    args = dict(x_ptr="*fp16", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", g_idx_ptr="*i32",
                out_ptr="*fp16", **ints)
    k = compile_for_gpu(w4a16_kernel, args, {"GROUPED": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                             "SPLIT_K": split}, capability=capability, num_warps=warps,
                        num_stages=stages)
    return {"kernel": "triton_w4a16 (fused, BLOCK_M=1)", "config": SKINNY_CONFIGS[0],
            **report(k, bk * bn // (32 * warps)).figures()}


def gemv_figures(capability: int) -> dict:
    """The batch-1 GEMV's SASS figures for sm_<capability>, 8192 x 8192 g128 (recorded by `minquant bench kernels`)."""
    return {"capability": capability, "config": triton_gemv.DEFAULT_CONFIG, **report(*compile_gemv(capability)).figures()}


def tc_figures(capability: int, M: int) -> dict:
    """The small-batch tensor-core kernel's SASS figures at M rows, 8192 x 8192 g128."""
    return {"capability": capability, "M": M, "config": triton_tc.first_config(M),
            **report(*compile_tc(capability, M)).figures()}


def run(out: Path | None = None) -> Path:
    """`minquant bench sass`: the GEMV's SASS figures for sm_80 and sm_90, compiled on this (CPU) machine."""
    rows = []
    for cap in (80, 90):
        for M, dt, permuted in ((1, "fp16", False), (1, "bf16", False), (1, "fp16", True), (2, "fp16", False),
                                (4, "fp16", False)):
            rows.append({"capability": cap, "M": M, "dtype": dt, "act_order": permuted,
                         **report(*compile_gemv(cap, M, dtype=dt, permuted=permuted)).figures()})
            print(f"sm_{cap} M={M} {dt}{' act-order' if permuted else ''}: {rows[-1]['summary']}", flush=True)
    before = [fused_kernel_figures(cap) for cap in (80, 90)]
    tc_rows = [tc_figures(cap, M) for cap in (80, 90) for M in (16, 64)]
    for r in tc_rows:
        print(f"tensor-core sm_{r['capability']} M={r['M']}: {r['summary']}", flush=True)
    protocol = {"shape": "K = N = 8192, g128", "config": triton_gemv.DEFAULT_CONFIG, "triton": triton.__version__,
                "how": "triton.compile for GPUTarget('cuda', cap, 32) with the JIT's specialisation (pointers and "
                       "ints divisible by 16 marked), SASS from cuobjdump; per weight = instructions in the main "
                       "loop / weights a thread handles per iteration"}
    return save_results(NAME, protocol, {"gemv": rows, "tc": tc_rows, "fused_kernel_batch1": before}, out)


def table(record: dict) -> str:
    p, r = record["protocol"], record["results"]
    lines = [f"SASS of the batch-1 GEMV (`minquant bench sass`, {record['date'][:10]}, Triton {p['triton']}; "
             f"{p['shape']}, compiled on a CPU for each architecture).", "",
             "| arch | rows of x | x dtype | act-order | SASS instr. per weight | 128-bit weight loads | I2F | spills | registers |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in r["gemv"]:
        wide = sum(v for k, v in row["loads"].items() if k.endswith(".128"))
        i2f = sum(v for k, v in row["converts"].items() if k.startswith("I2F"))
        lines.append(f"| sm_{row['capability']} | {row['M']} | {row['dtype']} | {'yes' if row['act_order'] else 'no'} | "
                     f"{row['instructions_per_weight']:.2f} | {wide} | {i2f} | {row['spills']} | {row['registers']} |")
    old = ", ".join(f"sm_{80 if i == 0 else 90} {b['instructions_per_weight']:.2f}" for i, b in enumerate(r["fused_kernel_batch1"]))
    lines += ["", f"The fused kernel it replaces at batch 1 spent {old} instructions per weight."]
    if r.get("tc"):
        tc = "; ".join(f"sm_{t['capability']} M={t['M']} {t['instructions_per_weight']:.2f} (config {tuple(t['config'])}, "
                       f"{t['spills']} spills, {t['registers']} registers)" for t in r["tc"])
        lines += ["", f"The small-batch tensor-core kernel, SASS instructions per weight: {tc}."]
    return "\n".join(lines)
