"""Where benchmarks keep their numbers: data/results/*.json with provenance, and the README's tables.

Every results file records the command, date, machine and versions next to the numbers, so a
notebook or the README can quote it without retyping anything. A leaf: it imports no benchmark
(the README writer is handed the table of each results file by `minquant.bench.registry`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "results"
README = RESULTS_DIR.parent.parent / "README.md"


def machine() -> dict:
    """What ran it: CPU model and cores, and the GPU if one was used."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import transformers

    import minquant

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "minquant": minquant.__version__}


def save_results(name: str, protocol: dict, results: dict, out: Path | None = None) -> Path:
    out = out or RESULTS_DIR / f"{name}.json"
    # `minquant ...`, `python -m minquant ...` (argv[0] is minquant/__main__.py) and minquant/cli.py are one command
    cli = sys.argv[0].endswith(("minquant", "minquant/__main__.py", "minquant/cli.py"))
    record = {"command": " ".join(["minquant", *sys.argv[1:]]) if cli else " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "protocol": protocol, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # renamed into place: a reader sees the old file or the new one, whole
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def load_results(name: str, missing_ok: bool = False) -> dict | None:
    """A results file written by `save_results`, by name (e.g. "rtn_smollm2"); None if missing and `missing_ok`."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file() and missing_ok:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}; run the benchmark that writes it (see data/results/README.md)")
    return json.loads(path.read_text())


def update_readme(names: Iterable[str], table_for: Callable[[str], Callable[[dict], str]], path: Path = README) -> None:
    """Rewrite the README's block `<!-- results:NAME -->` ... `<!-- /results:NAME -->` of each results file in `names`
    with its table (never typed by hand); a file that is missing, or has no block, is left alone."""
    text = path.read_text()
    for name in names:
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if (RESULTS_DIR / f"{name}.json").is_file() and start in text:
            head, rest = text.split(start, 1)
            text = f"{head}{start}\n{table_for(name)(load_results(name))}\n{end}{rest.split(end, 1)[1]}"
    path.write_text(text)
