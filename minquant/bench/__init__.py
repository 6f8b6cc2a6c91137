"""Benchmarks: scripts that measure and save numbers to data/results/, never tests.

    minquant bench rtn                    # RTN on SmolLM2 (perplexity) and MiniLM (embedding cosine)
    minquant bench gptq                   # GPTQ vs RTN vs llm-compressor on SmolLM2
    minquant bench readme                 # rewrite the README's results tables from data/results/

One module per benchmark, each with `run()` (measure, save) and `table(record)` (its Markdown
table); `registry.BENCHMARKS` lists them for the CLI and the README writer; `results` keeps the
files (provenance: command, date, machine, versions). `sweep` is the machinery of the resumable
model sweeps, `sass` reads GPU kernels' instructions without a GPU, and `peers/` holds the runners
of other tools (llm-compressor, HQQ), which run in their own venvs. The library never imports this
package; notebooks read results through it: `from minquant.bench import registry, results`.
"""
