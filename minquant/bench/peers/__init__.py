"""Other tools run side by side with minquant in `minquant bench` (notebooks 07-08 show the results).

Each runs in its own venv, built by `minquant.bench.sweep.ensure_peer_venv`: they pin versions of
transformers that minquant's environment does not use. Each is a script (`python -m
minquant.bench.peers.NAME --bits 4 ... --out result.json`) that quantizes and evaluates SmolLM2 the
way the sweep does and writes its numbers; nothing in minquant imports them.
"""
