"""Read what a Triton kernel becomes on an NVIDIA GPU, without a GPU: compile it here, count its SASS.

Triton compiles for any NVIDIA architecture on a CPU-only machine (ptxas ships in its wheel), and
cuobjdump/nvdisasm turn the binary into SASS, the instructions the GPU really runs. That makes the
properties that decide a memory-bound kernel's speed checkable in CI: how wide its global loads
are (LDG.E.128 moves 16 bytes per lane), whether it converts integers to floats (I2F, a quarter-
rate instruction), whether registers spill to local memory (STL/LDL), and how many instructions
its main loop spends per weight (the GPU issues about 4 per weight in the time memory delivers one).

The compile mimics the JIT's specialisation on a real call: pointers and integers divisible by 16
are marked so (it then emits vector loads) and integers equal to 1 become constants.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


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
