"""Nothing lost, nothing hung, nothing silently wrong: every bad input and interruption we tried.

Four tables, each row a parametrized test: a save interrupted at each of its steps (the folder
must load as the old or the new checkpoint, whole); a damaged or hostile checkpoint (the loader
names the file and tensor); bad arguments to `minquant.quantize` and `minquant.evaluate` (a clear
error before the model changes, or a warning where the result will be poor); and bad command
lines (exit code 2, one line, before any long work). README's "Reliability" section counts them.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import minquant
from minquant import atomic
from minquant.checkpoint import load_quantized, save_quantized
from minquant.cli import main
from minquant.nn import QuantLinear


def tiny(seed=0, vocab=64, positions=128, **extra):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=positions, **extra)
    return T.LlamaForCausalLM(cfg).eval()


def ids(n=8, seqlen=16, seed=0, vocab=64):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


X = ids(2, 12, seed=9)


def logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, minilm_tokenizer):
    """Model A (GPTQ W4 g32, saved in DIR) and model B (RTN W8 per channel) that a save puts over it."""
    a = minquant.quantize(tiny(0, vocab=len(minilm_tokenizer)), "gptq", bits=4, group_size=32,
                          calib=ids(vocab=len(minilm_tokenizer)), progress=False)
    b = minquant.quantize(tiny(1, vocab=len(minilm_tokenizer)), "rtn", bits=8, group_size=-1, progress=False)
    for m in (a, b):
        m.tokenizer = minilm_tokenizer
    ref = tmp_path_factory.mktemp("ref")
    minquant.save(a, ref / "a")
    minquant.save(b, ref / "b")
    la, lb = (logits(load_quantized(ref / n, dtype=torch.float32)[0]) for n in "ab")
    return a, b, la, lb, ref


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def loads_as(folder: Path, two_checkpoints) -> str:
    """'old' or 'new': which whole checkpoint `folder` holds (its files and its logits say the same)."""
    _, _, la, lb, ref = two_checkpoints
    got = logits(load_quantized(folder, dtype=torch.float32)[0])  # first: a load recovers an interrupted swap
    files = snapshot(folder)
    if files == snapshot(ref / "a"):
        assert torch.equal(got, la)
        return "old"
    assert files == snapshot(ref / "b"), sorted(files)
    assert torch.equal(got, lb)
    return "new"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.minquant-"))


# ---------------------------------------------------------------------------------------------
# 1. A save interrupted at each step: the folder holds the old or the new checkpoint, whole.
# ---------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """A kill, as far as the code under test can tell (BaseException: no `except Exception` catches it)."""


def fail_on_call(monkeypatch, owner, name, n=1, partial=None, when=None):
    """Make owner.name raise Interrupted on its n-th call (counting only calls whose first argument
    satisfies `when`, if given); `partial(*args)` first writes half a file."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        if when is None or when(args[0]):
            calls.append(1)
        if len(calls) == n and (when is None or when(args[0])):
            if partial is not None:
                partial(*args, **kwargs)
            raise Interrupted(f"{name} #{n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def half_weights(state, path, metadata=None):
    from safetensors.torch import save as to_bytes

    data = to_bytes(state, metadata=metadata)
    Path(path).write_bytes(data[: len(data) // 2])


def half_tokenizer(self, folder, *args, **kwargs):
    (Path(folder) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    raise OSError(errno.ENOSPC, "No space left on device")


STEPS = {  # where the save is interrupted -> (what is patched, how); expected: the old checkpoint
    "before anything is written": lambda mp: fail_on_call(mp, atomic.tempfile, "mkdtemp"),
    "during the weight write": lambda mp: fail_on_call(mp, __import__("minquant.checkpoint").checkpoint, "save_file",
                                                       partial=half_weights),
    "after the weights, before config.json": lambda mp: fail_on_call(mp, T.PretrainedConfig, "save_pretrained"),
    "writing generation_config.json": lambda mp: fail_on_call(mp, T.GenerationConfig, "save_pretrained"),
    "disk full while writing tokenizer.json": lambda mp: mp.setattr(T.PreTrainedTokenizerBase, "save_pretrained", half_tokenizer),
    "flushing the first file to disk": lambda mp: fail_on_call(mp, atomic.os, "fsync", n=1),
    "flushing the folder to disk": lambda mp: fail_on_call(mp, atomic, "_fsync", when=lambda path: Path(path).is_dir()),
    "setting file modes": lambda mp: fail_on_call(mp, Path, "chmod", n=2),
    "the atomic exchange": lambda mp: fail_on_call(mp, atomic, "_exchange"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_interrupted_save_leaves_the_old_checkpoint(step, two_checkpoints, tmp_path, monkeypatch):
    a, b, *_ = two_checkpoints
    out = tmp_path / "ckpt"
    minquant.save(a, out)
    with monkeypatch.context() as mp:
        STEPS[step](mp)
        with pytest.raises((Interrupted, OSError)):
            minquant.save(b, out)
    assert loads_as(out, two_checkpoints) == "old"
    assert leftovers(out) == []  # the failed save removed its temporary folder
    minquant.save(b, out)  # and the next save works
    assert loads_as(out, two_checkpoints) == "new" and leftovers(out) == []


def test_killed_between_the_two_renames_of_the_fallback_swap(two_checkpoints, tmp_path, monkeypatch):
    """Without renameat2 (macOS, some file systems) the old folder is moved aside first: dying right
    after that leaves no folder at all, and the next load or save puts the old one back."""
    a, b, *_ = two_checkpoints
    out = tmp_path / "ckpt"
    minquant.save(a, out)
    with monkeypatch.context() as mp:
        mp.setattr(atomic, "_exchange", lambda x, y: False)
        fail_on_call(mp, atomic.os, "replace", when=lambda src: atomic.TMP in str(src))  # the new one, into place
        with pytest.raises(Interrupted):
            minquant.save(b, out)
    assert not out.exists() and leftovers(out)  # what a kill there leaves
    assert loads_as(out, two_checkpoints) == "old"  # load_quantized recovered it
    with monkeypatch.context() as mp:
        mp.setattr(atomic, "_exchange", lambda x, y: False)
        minquant.save(b, out)
    assert loads_as(out, two_checkpoints) == "new" and leftovers(out) == []


def test_killed_after_the_swap_leaves_the_new_checkpoint(two_checkpoints, tmp_path, monkeypatch):
    a, b, *_ = two_checkpoints
    out = tmp_path / "ckpt"
    minquant.save(a, out)
    with monkeypatch.context() as mp:
        fail_on_call(mp, atomic.shutil, "rmtree")  # removing the old folder, the last step
        with pytest.raises(Interrupted):
            minquant.save(b, out)
    assert loads_as(out, two_checkpoints) == "new"
    minquant.save(b, out)
    assert leftovers(out) == []


KILLED_CLI = """
import os, sys, time
import safetensors.torch, transformers
# Stretch the save to ~1.5 s, as a big model's would be, so that the kill lands inside it: the
# weights are written in 8 chunks, and the tokenizer and each fsync take a moment.
def slow_save_file(tensors, path, metadata=None):
    print("writing weights", flush=True)
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        for i in range(8):
            f.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.08)
safetensors.torch.save_file = slow_save_file
real_tokenizer_save = transformers.PreTrainedTokenizerBase.save_pretrained
def slow_tokenizer_save(self, *args, **kwargs):
    time.sleep(0.2)
    return real_tokenizer_save(self, *args, **kwargs)
transformers.PreTrainedTokenizerBase.save_pretrained = slow_tokenizer_save
real_fsync = os.fsync
def slow_fsync(fd):
    time.sleep(0.05)
    real_fsync(fd)
os.fsync = slow_fsync
from minquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6, 0.9, 1.2, 3.0])
def test_sigkill_during_minquant_quantize_out(delay, tiny_llama_folder, two_checkpoints, tmp_path):
    """A real SIGKILL of `minquant quantize --out DIR`, `delay` seconds into its weight write (which
    takes 0.64 s here; then the tokenizer 0.2 s, the fsyncs 0.05 s each): DIR loads, whole."""
    _, _, _, _, ref = two_checkpoints
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in (ref / "a").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    old = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLI, "quantize", str(tiny_llama_folder), "--method", "rtn",
                             "--group-size", "32", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith("writing weights"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    model, _ = load_quantized(out, dtype=torch.float32)  # whichever it is, it loads whole
    files = snapshot(out)
    if delay <= 0.3:  # inside the weight write: the old checkpoint, untouched
        assert files == old and leftovers(out)  # (and the killed save's temporary folder)
    elif delay >= 3.0:
        assert files != old
    if files != old:  # the new one: RTN W4 g32 of the tiny folder's model, every file there
        qc = json.loads(files["config.json"])["quantization_config"]
        assert qc["minquant_method"] == "rtn" and {"model.safetensors", "tokenizer.json"} <= set(files)
    atomic.recover(out)  # what the next save does first
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# 2. Saving over what was there: replaced whole, never merged; strangers' folders refused.
# ---------------------------------------------------------------------------------------------

def test_a_save_never_merges_with_what_was_in_the_folder(two_checkpoints, tmp_path):
    a, b, _, lb, ref = two_checkpoints
    out = tmp_path / "ckpt"
    minquant.save(a, out)
    save_file({"model.norm.weight": torch.full((64,), 7.0)}, out / "z_old.safetensors")  # would override weights
    (out / "awq_search.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    minquant.save(b, out)
    assert snapshot(out) == snapshot(ref / "b")
    assert torch.equal(logits(load_quantized(out, dtype=torch.float32)[0]), lb)


def test_a_non_empty_folder_that_is_no_checkpoint_is_refused_unless_overwrite(two_checkpoints, tmp_path):
    a, *_ = two_checkpoints
    out = tmp_path / "my-documents"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="is not empty and holds no minquant checkpoint.*overwrite=True"):
        minquant.save(a, out)
    assert (out / "thesis.tex").read_text() == "years of work"
    minquant.save(a, out, overwrite=True)
    assert not (out / "thesis.tex").exists() and (out / "model.safetensors").is_file()


def test_every_file_and_the_folder_get_the_same_mode(two_checkpoints, tmp_path):
    a, *_ = two_checkpoints
    minquant.save(a, tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask


def test_save_load_save_writes_the_same_config_and_plan(tmp_path, minilm_tokenizer):
    """quantization_config (method, desc_act, static_groups, damp) and mixed_plan.json survive a round trip."""
    model = minquant.quantize(tiny(vocab=len(minilm_tokenizer)), "gptq", bits=4, group_size=32, act_order=True,
                              static_groups=True, damp=0.05, bits_budget=3.5, sensitivity_samples=2,
                              calib=ids(vocab=len(minilm_tokenizer)), tokenizer=minilm_tokenizer, progress=False)
    minquant.save(model, tmp_path / "one")
    again = minquant.load(tmp_path / "one")
    minquant.save(again, tmp_path / "two")
    one, two = (json.loads((tmp_path / n / "config.json").read_text())["quantization_config"] for n in ("one", "two"))
    assert one == two and one["minquant_method"] == "gptq" and one["damp_percent"] == 0.05
    assert one["desc_act"] is True and one["static_groups"] is True and "dynamic" in one
    assert (tmp_path / "two" / "mixed_plan.json").read_text() == (tmp_path / "one" / "mixed_plan.json").read_text()


def test_an_awq_search_is_saved_again_after_a_load(tmp_path):
    model = minquant.quantize(tiny(), "awq", bits=4, group_size=32, calib=ids(), progress=False)
    minquant.save(model, tmp_path / "one")
    minquant.save(minquant.load(tmp_path / "one"), tmp_path / "two")
    one, two = (load_file(tmp_path / n / "awq_search.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------------------------------------
# 3. A checkpoint that is damaged or hostile: the loader names the file and the tensor.
# ---------------------------------------------------------------------------------------------

Q = "model.layers.0.mlp.gate_proj"


def edit_tensors(**changes):
    def damage(folder: Path):
        tensors = load_file(folder / "model.safetensors")
        for name, fn in changes.items():
            tensors[name.replace("__", ".").replace("Q.", Q + ".")] = fn(tensors[name.replace("__", ".").replace("Q.", Q + ".")])
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def edit_qc(**changes):
    def damage(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] |= changes
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def write(name, content):
    return lambda folder: (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def truncate(name):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:-1000])


BAD_CHECKPOINTS = {  # damage -> the message that must name it
    "qweight stored as float32": (edit_tensors(**{"Q.qweight": lambda t: t.float()}), r"model.safetensors: tensor .*gate_proj.qweight is torch.float32, expected torch.int32"),
    "qweight stored as int64": (edit_tensors(**{"Q.qweight": lambda t: t.long()}), r"gate_proj.qweight is torch.int64, expected torch.int32"),
    "qzeros stored as int16": (edit_tensors(**{"Q.qzeros": lambda t: t.short()}), r"gate_proj.qzeros is torch.int16, expected torch.int32"),
    "scales stored as int32": (edit_tensors(**{"Q.scales": lambda t: t.int()}), r"gate_proj.scales is torch.int32, expected a floating-point"),
    "g_idx stored as float": (edit_tensors(**{"Q.g_idx": lambda t: t.float()}), r"gate_proj.g_idx is torch.float32, expected torch.int32"),
    "g_idx holding -1": (edit_tensors(**{"Q.g_idx": lambda t: t - 1}), r"gate_proj.g_idx holds group numbers from -1 to 0; this layer has groups 0..1"),
    "g_idx all zero": (edit_tensors(**{"Q.g_idx": torch.zeros_like}), r"gate_proj.g_idx puts 64 columns in group 0; every group of this layer has 32"),
    "g_idx holding 999": (edit_tensors(**{"Q.g_idx": lambda t: t.masked_fill(t == 1, 999)}), r"gate_proj.g_idx holds group numbers from 0 to 999"),
    "NaN scales": (edit_tensors(**{"Q.scales": lambda t: t.masked_fill(torch.arange(t.numel()).reshape(t.shape) == 3, float("nan"))}), r"gate_proj.scales has 1 NaN/Inf values"),
    "Inf in a norm weight": (edit_tensors(**{"model__norm__weight": lambda t: t.masked_fill(torch.arange(64) == 0, float("inf"))}), r"tensor model.norm.weight has 1 NaN/Inf values"),
    "a truncated weight file": (truncate("model.safetensors"), r"model.safetensors is not a readable safetensors file"),
    "a weight file of garbage": (write("model.safetensors", b"\x00" * 64), r"model.safetensors is not a readable safetensors file"),
    "config.json of garbage": (write("config.json", "{'model_type': llama"), r"config.json is not valid JSON"),
    "config.json holding a list": (write("config.json", "[1, 2]"), r"config.json holds a JSON list, expected an object"),
    "quantization_config holding a string": (edit_qc(), None),  # placeholder replaced below
    "bits 5": (edit_qc(bits=5), r"config.json: quantization_config: bits 5: the GPTQ layout packs 2, 3, 4 or 8 bits"),
    "group_size 'abc'": (edit_qc(group_size="abc"), r"config.json: quantization_config: group_size must be"),
    "a dynamic rule that is not a regex": (edit_qc(dynamic={"+:model.layers.(": {"bits": 8}}), r"config.json: quantization_config: .*model.layers.\("),
    "a dynamic rule with a backreference": (edit_qc(dynamic={r"+:(a)\1": {}}), r"config.json: quantization_config: .*"),
    "a dynamic override of 9 bits": (edit_qc(dynamic={r"+:.*q_proj$": {"bits": 9}}), r"config.json: quantization_config: bits must be"),
    "an index pointing outside the folder": (write("model.safetensors.index.json", '{"weight_map": {"a": "../../etc/passwd"}}'), r"index.json lists '../../etc/passwd': weight files must lie in the checkpoint folder"),
    "an index listing a missing file": (write("model.safetensors.index.json", '{"weight_map": {"a": "model-2.safetensors"}}'), r"index.json lists model-2.safetensors, which is not in"),
    "a tensor of the wrong shape": (edit_tensors(**{"Q.qweight": lambda t: t[:4]}), r"gate_proj.qweight has shape \(4, 128\), expected \(8, 128\)"),
    "a tensor missing": (lambda f: edit_tensors()(f) or _drop(f, Q + ".scales"), r"missing tensor\(s\) model.layers.0.mlp.gate_proj.scales"),
    "a packed layer the rules keep float": (edit_qc(dynamic={rf"-:{Q}$": {}}), r"gate_proj has packed weights but the quantization_config's dynamic rules say it is not quantized"),
    "mixed_plan.json of garbage": (write("mixed_plan.json", '{"layers": 3}'), r"mixed_plan.json is not a mixed plan minquant wrote"),
    "awq_search.safetensors from elsewhere": (lambda f: save_file({"x": torch.zeros(1)}, f / "awq_search.safetensors"), r"awq_search.safetensors is not an AWQ search result"),
    "a damaged tokenizer.json": (write("tokenizer.json", '{"version": "1.0", "trunc'), r"its tokenizer files cannot be read"),
}
BAD_CHECKPOINTS["quantization_config holding a string"] = (
    lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()), "quantization_config": "gptq"})),
    r"config.json: quantization_config is a str, expected an object")


def _drop(folder: Path, name: str):
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture
def checkpoint(two_checkpoints, tmp_path):
    a, *_ = two_checkpoints
    return minquant.save(a, tmp_path / "ckpt")


@pytest.mark.parametrize("damage", list(BAD_CHECKPOINTS))
def test_a_damaged_checkpoint_is_named(damage, checkpoint):
    make, message = BAD_CHECKPOINTS[damage]
    make(checkpoint)
    with pytest.raises(ValueError, match=message):
        load_quantized(checkpoint)


def test_stale_weight_files_beside_the_checkpoint_are_not_read(checkpoint, two_checkpoints):
    save_file({"model.norm.weight": torch.full((64,), 7.0)}, checkpoint / "z_old.safetensors")
    assert torch.equal(logits(load_quantized(checkpoint, dtype=torch.float32)[0]), two_checkpoints[2])


@pytest.mark.parametrize("pattern", ["+:(.|.)*Z$", "+:(a*)*b", "-:(x+x+)+y", "+:(.*a){20}"])
def test_a_catastrophic_dynamic_pattern_finishes_in_under_a_second(pattern, checkpoint):
    """Python's re would backtrack for hours on these (the first kept `minquant eval` at 100% CPU)."""
    edit_qc(dynamic={pattern: {"bits": 8}})(checkpoint)
    start = time.perf_counter()
    try:
        load_quantized(checkpoint)  # loads (the rule matches nothing) or refuses the pattern: either way, fast
    except ValueError as e:
        assert "quantization_config" in str(e)
    assert time.perf_counter() - start < 1.0 + 2.0  # + the ~1 s a tiny model takes to build and load


@pytest.mark.parametrize("pattern", ["+:(.|.)*Z$", "+:(?:" + "(.*)" * 48 + ")*Z", "-:" + "((.*)*)*" * 20 + "Z"])
def test_hostile_rules_over_a_whole_model_take_under_a_second(pattern):
    """The matching alone, over SmolLM2's 210 linears with the loader's budget: each of these is either
    matched (the first) or refused for its cost (the others, written to be as slow as 200 characters allow)."""
    from minquant.checkpoint import module_config, rules_budget

    names = [f"model.layers.{i}.{part}_proj" for i in range(30)
             for part in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")]
    qc = {"bits": 4, "group_size": 64, "sym": False, "dynamic": {pattern: {"bits": 8}}}
    budget = rules_budget(len(names))  # as load_quantized sets it
    start = time.perf_counter()
    try:
        assert all(module_config(qc, name, budget).bits == 4 for name in names)  # no name ends in Z
    except ValueError as e:
        assert "costs more than" in str(e)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------
# 4. Bad arguments to quantize / evaluate: an error before anything changes, or a warning.
# ---------------------------------------------------------------------------------------------

def big_weight(value):
    def make(model):
        model.model.layers[1].mlp.up_proj.weight.data[0, 0] = value
        return model
    return make


def tiny_opt(bias=0.0):
    torch.manual_seed(0)
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                       word_embed_proj_dim=64, max_position_embeddings=64)).eval()
    opt.model.decoder.layers[0].fc1.bias.data[0] = bias
    return opt


BAD_QUANTIZE = {  # name -> (model maker, quantize arguments, error type, message)
    "RTN with act_order": (tiny, dict(method="rtn", act_order=True), ValueError, r"act_order=True: not option\(s\) of method='rtn'"),
    "RTN with static_groups": (tiny, dict(method="rtn", static_groups=True), ValueError, r"static_groups=True: not option"),
    "RTN with damp": (tiny, dict(method="rtn", damp=0.1), ValueError, r"damp=0.1: not option\(s\) of method='rtn'"),
    "RTN with calibration data": (tiny, dict(method="rtn", calib=ids()), ValueError, r"calib=<token ids \(8, 16\)>: not option\(s\) of method='rtn' \(RTN rounds"),
    "AWQ with damp": (tiny, dict(method="awq", damp=0.1, calib=ids()), ValueError, r"damp=0.1: not option\(s\) of method='awq'"),
    "AWQ with act_order": (tiny, dict(method="awq", act_order=True, calib=ids()), ValueError, r"act_order=True: not option"),
    "GPTQ with clip=False": (tiny, dict(clip=False, calib=ids()), ValueError, r"clip=False: not option\(s\) of method='gptq'"),
    "weights of 1e6 (inf fp16 scales)": (lambda: big_weight(1e6)(tiny()), dict(method="rtn"), ValueError, r"mlp.up_proj: weights up to 1e\+06 need scales up to 1.333e\+05, beyond fp16's largest"),
    "a finite weight of 2e6 (not 'NaN/Inf')": (lambda: big_weight(2e6)(tiny()), dict(calib=ids()), ValueError, r"block 1 mlp.up_proj: weights up to 2e\+06"),
    "an OPT bias of 1e5 (fp16 inf)": (lambda: tiny_opt(1e5), dict(method="rtn"), ValueError, r"fc1: bias has values \(up to 1e\+05\) that fp16"),
    "NaN weights": (lambda: big_weight(float("nan"))(tiny()), dict(calib=ids()), ValueError, r"model.layers.1.mlp.up_proj.weight has 1 NaN/Inf values; nothing was quantized"),
    "bits_budget=100 (every layer fp16)": (tiny, dict(bits_budget=100, calib=ids()), ValueError, r"keeps every layer in fp16 \(16 bits\): nothing would be quantized"),
    "bits_budget=nan": (tiny, dict(bits_budget=float("nan"), calib=ids()), ValueError, r"bits_budget must be a positive, finite number"),
    "bits_budget=inf": (tiny, dict(bits_budget=float("inf"), calib=ids()), ValueError, r"bits_budget must be a positive, finite number"),
    "bits_budget=1 (unreachable)": (tiny, dict(bits_budget=1, calib=ids()), ValueError, r"below what these options allow"),
    "bits_budget='4'": (tiny, dict(bits_budget="four", calib=ids()), ValueError, r"bits_budget must be a number"),
    "batch_size=0": (tiny, dict(batch_size=0, calib=ids()), ValueError, r"batch_size must be a positive integer, got 0"),
    "ids outside the vocabulary": (tiny, dict(calib=torch.arange(100, 228).reshape(8, 16)), ValueError, r"token ids range from 100 to 227, but the model's vocabulary has 64 \(ids 0..63\): a tokenizer from another model"),
    "negative ids": (tiny, dict(calib=torch.cat([torch.full((8, 1), -1), ids(8, 15)], 1)), ValueError, r"token ids range from -1 to \d+, but"),
    "NaN in a norm weight": (lambda: nan_norm(tiny()), dict(calib=ids()), ValueError, r"model.layers.1.input_layernorm.weight has 64 NaN/Inf values; nothing was quantized"),
    "windows longer than the positions": (lambda: tiny(positions=8), dict(calib=ids()), ValueError, r"windows of 16 tokens are longer than the model's 8 positions"),
    "a device this build lacks": (tiny, dict(calib=ids(), device="cuda"), ValueError, r"device 'cuda'"),
    "a device that does not exist": (tiny, dict(calib=ids(), device="warp-drive"), ValueError, r"unknown device 'warp-drive'"),
    "an nn.Sequential": (lambda: torch.nn.Sequential(torch.nn.Linear(64, 64)), dict(method="rtn"), TypeError, r"takes a Hugging Face model \(one with .config\), got a Sequential"),
    "float token ids": (tiny, dict(calib=torch.rand(4, 16)), ValueError, r"non-empty \(n, seqlen\) integer tensor"),
    "empty calibration data": (tiny, dict(calib=torch.zeros(0, 16, dtype=torch.long)), ValueError, r"non-empty \(n, seqlen\) integer tensor"),
    "sensitivity_samples=0": (tiny, dict(bits_budget=3.5, sensitivity_samples=0, calib=ids()), ValueError, r"sensitivity_samples must be a positive integer"),
    "sensitivity_samples without a budget": (tiny, dict(sensitivity_samples=4, calib=ids()), ValueError, r"sensitivity_samples=4 is read only with bits_budget"),
}


@pytest.mark.parametrize("case", list(BAD_QUANTIZE))
def test_bad_quantize_arguments_fail_before_the_model_changes(case):
    make, kwargs, error, message = BAD_QUANTIZE[case]
    if case == "a device this build lacks" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        minquant.quantize(model, **{"method": "gptq", "group_size": 32, "progress": False, **kwargs})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k], ) or before[k].isnan().any() for k in before)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert getattr(model, "minquant_unusable", None) is None


def nan_norm(model):
    model.model.layers[1].input_layernorm.weight.data[:] = float("nan")  # block 1's activations become NaN
    return model


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_failure_part_way_leaves_the_model_marked_and_refused(method, tmp_path):
    model = tiny()  # block 1's activations overflow (as fp16 ones can): found only once block 0 is done
    model.model.layers[1].input_layernorm.register_forward_hook(lambda module, args, out: out * float("inf"))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj: its calibration inputs \(H\) have NaN/Inf"):
        minquant.quantize(model, method, group_size=32, calib=ids(), progress=False)
    for call in (lambda: model(X), lambda: minquant.quantize(model, "rtn", group_size=32, progress=False),
                 lambda: minquant.save(model, tmp_path / "x"), lambda: minquant.evaluate(model, X, seqlen=8)):
        with pytest.raises(RuntimeError, match=f"neither float nor quantized: minquant.quantize\\(method='{method}'\\) failed part-way"):
            call()
    assert not (tmp_path / "x").exists()


def test_ctrl_c_during_gptq_leaves_the_model_marked(monkeypatch):
    import minquant.gptq

    model, calls, real = tiny(), [], minquant.gptq.gptq_quantize

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # block 0's last groups: q/k/v and o are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(minquant.gptq, "gptq_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        minquant.quantize(model, "gptq", group_size=32, calib=ids(), progress=False)
    with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
        model(X)


@pytest.mark.parametrize("calib,warning", [
    (ids(1, 16), r"only 16 calibration tokens for layers 128 inputs wide"),
    (torch.zeros(8, 16, dtype=torch.long), r"every calibration token is id 0"),
])
def test_poor_calibration_data_is_warned_about(calib, warning):
    with pytest.warns(UserWarning, match=warning):
        minquant.quantize(tiny(), "gptq", group_size=32, calib=calib, progress=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(seqlen=0), r"seqlen must be a whole number of tokens >= 2 \(one predicts the next\), got 0"),
    (dict(seqlen=-5), r"seqlen must be a whole number of tokens >= 2 \(one predicts the next\), got -5"),
    (dict(seqlen=100_000), r"windows of 100000 tokens are longer than the model's 128 positions \(max_position_embeddings\); use seqlen <= 128"),
    (dict(seqlen=8, max_windows=0), r"max_windows must be a positive number of windows"),
    (dict(seqlen=8, data=torch.arange(64, 128)[None]), r"token ids range from 64 to 127, but the model's vocabulary has 64 \(ids 0..63\): a tokenizer from another model"),
])
def test_bad_evaluate_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        minquant.evaluate(tiny(), **{"data": ids(1, 64), **kwargs}, progress=False)


# ---------------------------------------------------------------------------------------------
# 5. Bad command lines: exit code 2, one line, before any long work.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_long_work(monkeypatch):
    """Make sure the command fails before loading a model or quantizing."""
    def refuse(*args, **kwargs):
        raise AssertionError("the long work started before the bad argument was reported")

    monkeypatch.setattr(minquant, "quantize", refuse)
    monkeypatch.setattr(minquant, "load_model", refuse)


def stranger_folder(tmp_path):
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    return str(tmp_path / "stranger")


BAD_COMMANDS = {  # name -> (argv, with tmp_path, message); {tmp} is replaced by the test's folder
    "--out ''": (["quantize", "smollm2-135m", "--out", ""], r"the output folder is empty"),
    "--out a stranger's folder": (["quantize", "smollm2-135m", "--out", "{stranger}"], r"is not empty and holds no minquant checkpoint.*--overwrite"),
    "--out a file": (["quantize", "smollm2-135m", "--out", "{file}"], r"is a file, not a folder"),
    "--device cuda without CUDA": (["quantize", "smollm2-135m", "--device", "cuda", "--out", "{tmp}/q"], r"device 'cuda'"),
    "eval --device cuda without CUDA": (["eval", "smollm2-135m", "--device", "cuda"], r"device 'cuda'"),
    "generate --no-chat --prompt ''": (["generate", "smollm2-135m", "--no-chat", "--prompt", ""], r"the prompt is empty"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_lines_fail_at_once(case, tmp_path, capsys, no_long_work):
    argv, message = BAD_COMMANDS[case]
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "a-file").write_text("x")
    stranger = stranger_folder(tmp_path)
    argv = [a.format(tmp=tmp_path, stranger=stranger, file=tmp_path / "a-file") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"minquant {argv[0]}: error: "), err
    assert __import__("re").search(message, err), err


ARGPARSE_ERRORS = {  # argparse itself refuses these: exit code 2 and a usage line
    "eval --seqlen 0": (["eval", "m", "--seqlen", "0"], "--seqlen: must be at least 1, got 0"),
    "eval --seqlen -3": (["eval", "m", "--seqlen", "-3"], "--seqlen: must be at least 1, got -3"),
    "eval --max-windows -1": (["eval", "m", "--max-windows", "-1"], "--max-windows: expected a whole number >= 0"),
    "memory --context -100000": (["memory", "m", "--context", "-100000"], "--context: must be at least 1"),
    "memory --batch -3": (["memory", "m", "--batch", "-3"], "--batch: must be at least 1"),
    "quantize --group-size 0": (["quantize", "m", "--out", "x", "--group-size", "0"], "--group-size: expected a positive group size or -1"),
    "quantize --n-samples 0": (["quantize", "m", "--out", "x", "--n-samples", "0"], "--n-samples: must be at least 1"),
    "generate --max-new-tokens 0": (["generate", "m", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
}


@pytest.mark.parametrize("case", list(ARGPARSE_ERRORS))
def test_bad_numbers_on_the_command_line(case, capsys):
    argv, message = ARGPARSE_ERRORS[case]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_cli_quantize_rtn_with_act_order_is_refused_before_saving(tiny_llama_folder, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_folder), "--method", "rtn", "--act-order", "--out", str(tmp_path / "q")]) == 2
    assert "act_order=True: not option(s) of method='rtn'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_cli_eval_seqlen_beyond_the_model_positions(tiny_llama_folder, capsys):
    assert main(["eval", str(tiny_llama_folder), "--seqlen", "100000"]) == 2
    assert "windows of 100000 tokens are longer than the model's 256 positions" in capsys.readouterr().err


def test_cli_memory_picks_a_group_size_that_fits(capsys):
    assert main(["memory", "smollm2-135m"]) == 0
    assert "group size 64 (the first of 128/64/32 that divides every row)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["a truncated weight file", "config.json of garbage", "NaN scales"])
def test_cli_eval_of_a_damaged_checkpoint_is_one_line_naming_the_file(damage, checkpoint, capsys):
    BAD_CHECKPOINTS[damage][0](checkpoint)
    assert main(["eval", str(checkpoint), "--max-windows", "1", "--seqlen", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoint) in err, err


def test_cli_quantize_seqlen_beyond_the_positions_fails_before_the_calibration_text(tiny_llama_folder, tmp_path, capsys,
                                                                                   monkeypatch):
    import minquant.data

    monkeypatch.setattr(minquant.data, "calibration_windows", lambda *a, **k: pytest.fail("tokenized the text"))
    assert main(["quantize", str(tiny_llama_folder), "--group-size", "32", "--seqlen", "100000", "--out", str(tmp_path / "q")]) == 2
    assert "calibration windows of 100000 tokens are longer than the model's 256 positions" in capsys.readouterr().err


@pytest.mark.parametrize("damage,message", [
    (truncate("model.safetensors"), "model.safetensors cannot be read (SafetensorError"),
    (write("tokenizer.json", '{"version": "1.0", "trunc'), "tokenizer.json is not valid JSON"),
    (write("config.json", "{'model_type': llama"), "config.json is not valid JSON"),
])
def test_cli_eval_of_a_damaged_float_folder_is_one_line_naming_the_file(damage, message, tiny_llama_folder, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_llama_folder, tmp_path / "float")
    damage(folder)
    assert main(["eval", str(folder), "--max-windows", "1", "--seqlen", "8"]) == 2
    err = capsys.readouterr().err.strip()  # (after transformers' progress bar, if it got that far)
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("minquant eval: error: ") and message in last and str(folder) in last, err
