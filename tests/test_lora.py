"""LoRA adapters: made with peft on diffusers' Kandinsky5Transformer3DModel and saved the library's way, loaded by k5.

The oracle is diffusers itself: `KandinskyLoraLoaderMixin.load_lora_weights` + `set_adapters` (peft's unmerged
forward, base(x) + scale * alpha/r * B(A(x))). k5 merges the adapters into its weights; those weights put into the
diffusers model give the oracle's velocity to fp32 rounding (<= 1e-5 relative; measured ~1e-7). k5's own forward
is compared with the oracle at the DiT's known bound (test_dit: diffusers rounds q/k to bf16 inside its RoPE).
Tensor parallelism (TP 2, TP 2 x Ulysses 2) is compared with one process (<= 1e-4), with every rank's reads of
base tensors and LoRA factors recorded; switching adapters is compared with fresh loads bit for bit.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel
from diffusers.loaders import KandinskyLoraLoaderMixin
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from distributed import run_distributed
from k5.engine.checkpoints import lora
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import load_rank_dit, switch_dit_adapters, tp_factor_reader, tp_reader
from k5.engine.checkpoints.dit import load_dit, switch_adapters
from numerics import rel_err
from test_dit import SHAPES, inputs, make_reference, reference_forward
from test_sharded_load import RecordingSlice, check_reads, recording, split_dim

KIND = "cond"  # 4 heads of 16, ff 128: TP 2 leaves 2 heads a rank, Ulysses 2 then 1
SF = (1.0, 2.0, 2.0)
ATTN_FFN = ["to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer",
            "feed_forward.in_layer", "feed_forward.out_layer"]
# Adapter A: attention and FFN everywhere, one rank/alpha pattern. Adapter B: other layers (modulation: the
# gathered column-parallel Linears; embeddings and output: replicated), rsLoRA scaling.
SPEC_A = dict(r=4, lora_alpha=8, target_modules=ATTN_FFN, rank_pattern={"feed_forward.in_layer": 2},
              alpha_pattern={"cross_attention.out_layer": 3})
SPEC_B = dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["to_query", "visual_modulation.out_layer",
              "text_modulation.out_layer", "visual_embeddings.in_layer", "out_layer.out_layer"])


def lora_model(spec: dict, seed: int):
    """diffusers' transformer with a peft LoRA whose factors are random and non-zero (peft zero-inits B)."""
    torch.manual_seed(seed)
    model = Kandinsky5Transformer3DModel(patch_size=(1, 2, 2), **SHAPES[KIND])
    model.add_adapter(LoraConfig(**spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def save_diffusers_lora(folder, spec: dict, seed: int):
    """What a diffusers training script writes: get_peft_model_state_dict + save_lora_weights with the config."""
    model = lora_model(spec, seed)
    KandinskyLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return folder


class Holder(KandinskyLoraLoaderMixin):
    """The mixin on the one component it loads into (a pipeline without text encoders and VAE)."""

    hf_device_map = None

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def components(self):
        return {"transformer": self.transformer}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_reference(KIND)
    base.save_pretrained(root / "base" / "transformer")
    return dict(base=root / "base", a=save_diffusers_lora(root / "a", SPEC_A, 1),
                b=save_diffusers_lora(root / "b", SPEC_B, 2))


def diffusers_lora(setup, loras: list[tuple[str, float]], inp):
    """diffusers' velocity with the adapters loaded the library's way, and its weights after fuse_lora."""
    ref = Kandinsky5Transformer3DModel.from_pretrained(setup["base"] / "transformer", torch_dtype=torch.float32)
    holder = Holder(ref.eval())
    names = [f"adapter_{name}" for name, _ in loras]  # not "b": diffusers' warning filter matches it in "blocks"
    for (name, _), adapter_name in zip(loras, names):
        holder.load_lora_weights(setup[name], adapter_name=adapter_name)
    if loras:
        ref.set_adapters(names, weights=[s for _, s in loras])
    velocity = reference_forward(ref, inp, SF)
    if loras:
        holder.fuse_lora(adapter_names=names)
        holder.unload_lora_weights()  # drops the peft layers, keeps the fused weights
    return velocity, ref.state_dict()


def k5_forward(model, inp):
    with torch.no_grad():
        return model(inp["x"], inp["text"], inp["pooled"], inp["t"], scale_factor=SF)


def with_weights(state: dict):
    """diffusers' transformer holding ``state`` (k5's merged weights: the module trees are identical)."""
    ref = make_reference(KIND)
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("loras", [[("a", 1.0)], [("b", 0.7)], [("a", 0.5), ("b", -1.25)]])
def test_merged_lora_gives_diffusers_velocity(setup, loras):
    inp = inputs(SHAPES[KIND], B=2)
    want, fused = diffusers_lora(setup, loras, inp)
    base, base_state = diffusers_lora(setup, [], inp)
    assert rel_err(base, want) > 0.05  # the adapters matter

    adapters = [lora.open_lora(setup[name], scale) for name, scale in loras]
    ours = load_dit(setup["base"], torch.float32, adapters=adapters)
    assert ours.lora_adapters == tuple(adapters)
    state = ours.state_dict()
    assert state.keys() == fused.keys()
    changed = [k for k in state if not torch.equal(fused[k], base_state[k])]
    assert sorted(changed) == sorted({w for a in adapters for w in a.targets})  # diffusers fused just those
    for k in state:  # fp32 merges of the same factors: equal up to the order of the additions
        assert rel_err(state[k], fused[k]) <= 1e-6, k
    # Same velocity: k5's weights in the diffusers model against diffusers' unfused peft forward. The two differ
    # by fp32 rounding, which the bf16 rounding of q/k in diffusers' RoPE occasionally turns into one bf16 step
    # (measured 5e-7 to 4e-6).
    assert rel_err(reference_forward(with_weights(state), inp, SF), want) <= 1e-5
    assert rel_err(k5_forward(ours, inp), want) <= 1e-3  # test_dit's bound for the DiT itself


def test_adapter_records_and_scaling(setup):
    a = lora.open_lora(setup["a"], 0.5)
    file = setup["a"] / "pytorch_lora_weights.safetensors"
    assert a.path == file.resolve() and a.config_source == "header"
    rec = a.record()
    assert rec["sha256"] == lora.sha256_file(file) and rec["scale"] == 0.5 and rec["ranks"] == [2, 4]
    # 2 visual blocks x 10 Linears + 1 text block x 6 (self-attention and FFN only)
    assert rec["layers"] == 26
    t = a.targets
    assert t["visual_transformer_blocks.0.self_attention.to_query.weight"].scaling == 8 / 4
    assert t["visual_transformer_blocks.1.feed_forward.in_layer.weight"].scaling == 8 / 2  # rank_pattern
    assert t["visual_transformer_blocks.0.cross_attention.out_layer.weight"].scaling == 3 / 4  # alpha_pattern
    b = lora.open_lora(setup["b"])
    assert b.targets["out_layer.out_layer.weight"].scaling == pytest.approx(5 / 3**0.5)  # rsLoRA


def _alt_formats(setup, folder):
    """Adapter A in the other layouts k5 accepts, made from the diffusers file's tensors."""
    src = setup["a"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
        config = {k.removeprefix("transformer."): v
                  for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    out = {}
    # peft's own save_pretrained of a PeftModel holding the same factors (adapter_model.safetensors with keys under
    # base_model.model., adapter_config.json beside it)
    model = Kandinsky5Transformer3DModel(patch_size=(1, 2, 2), **SHAPES[KIND])
    peft_model = get_peft_model(model, LoraConfig(**SPEC_A))
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in tensors.items()})
    assert not result.unexpected_keys
    peft_model.save_pretrained(folder / "peft")
    out["peft"] = folder / "peft"
    # the official Kandinsky 5 LoRA repos: lora.safetensors (peft model state, adapter name kept) + config_lora.json
    official = folder / "official"
    official.mkdir()
    save_file({f"base_model.model.{k.replace('.weight', '.default.weight')}": v for k, v in tensors.items()},
              official / "lora.safetensors", metadata={"trigger": "M1CR0W4V3 r0t4tION, "})
    (official / "config_lora.json").write_text(json.dumps(config))
    out["official"] = official
    # original module names, lora_down/lora_up and kohya alpha scalars (alpha / rank = the peft scaling)
    ad = lora.open_lora(setup["a"])
    kohya = {}
    for name, t in ad.targets.items():
        module = name.removesuffix(".weight")
        kohya[f"{module}.lora_down.weight"] = tensors[f"{module}.lora_A.weight"]
        kohya[f"{module}.lora_up.weight"] = tensors[f"{module}.lora_B.weight"]
        kohya[f"{module}.alpha"] = torch.tensor(t.scaling * t.rank)
    save_file(kohya, folder / "kohya.safetensors")
    out["kohya"] = folder / "kohya.safetensors"
    return out


def test_other_layouts_merge_the_same(setup, tmp_path):
    want = load_dit(setup["base"], torch.float32, adapters=[lora.open_lora(setup["a"], 0.8)])
    for kind, path in _alt_formats(setup, tmp_path).items():
        ad = lora.open_lora(path, 0.8)
        got = load_dit(setup["base"], torch.float32, adapters=[ad])
        # The same factors, read from another file (another alignment of the views the GEMM B @ A reads): equal up to
        # rounding, as test_merged_lora_gives_diffusers_velocity's fp32 merges.
        for name, p in want.state_dict().items():
            err = rel_err(got.state_dict()[name], p)
            assert err <= 1e-6, f"{kind} {name}: merged weight vs the diffusers file's, fp32 rel err {err:.1e} > 1e-6"
        assert ad.trigger == ("M1CR0W4V3 r0t4tION, " if kind == "official" else None)


def test_switching_restores_base_weights_exactly(setup):
    adapters = {"a": lora.open_lora(setup["a"], 0.9), "b": lora.open_lora(setup["b"], 1.1)}
    fresh = {k: load_dit(setup["base"], torch.float32, adapters=[v] if v else []).state_dict()
             for k, v in [("none", None), *adapters.items()]}
    model = load_dit(setup["base"], torch.float32, adapters=[adapters["a"]])
    for step in ["none", "b", "a", "a"]:
        touched = switch_adapters(model, setup["base"], [adapters[step]] if step != "none" else [])
        state = model.state_dict()
        # Bitwise: the switch merges with the same addmm_ on the same factor views as the fresh load, then copies.
        assert all(torch.equal(state[k], v) for k, v in fresh[step].items()), step
    assert touched == []  # a -> a: nothing to do
    # bf16 weights too: re-read and cast, never "merged minus delta"
    model = load_dit(setup["base"], torch.bfloat16, adapters=[adapters["b"]])
    switch_adapters(model, setup["base"], [])
    base16 = load_dit(setup["base"], torch.bfloat16).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base16.items())


# ---- tensor parallelism ----------------------------------------------------------------------------------------

def recording_factors(reader, log):
    return lambda weight, which, sl: reader(weight, which, RecordingSlice(sl, f"{weight}:{which}", log))


def check_factor_reads(logs: list[list], adapters, tp: int) -> None:
    """Each rank reads each factor once: B's rows 1/tp for a weight split by rows, A's columns 1/tp for one split
    by columns (split_dim: test_sharded_load's own pattern, not the plan in parallel/tensor.py), the rest whole;
    the ranks' slices of a factor tile it. Reads happen in the same order on every rank, so the n-th read of a name
    is the same adapter's factor everywhere."""
    expected = sorted(f"{w}:{x}" for ad in adapters for w in ad.targets for x in "AB")
    spans = {}
    for rank, log in enumerate(logs):
        assert sorted(n for n, *_ in log) == expected, rank
        seen = Counter()
        for name, full, key, got in log:
            weight, which = name.rsplit(":", 1)
            cut = {(0, "B"): 0, (1, "A"): 1}.get((split_dim(weight), which))
            want = tuple(n // tp if d == cut else n for d, n in enumerate(full))
            assert got == want, (rank, name, full, got)
            if cut is not None:
                spans.setdefault((name, seen[name]), []).append((key[cut], full[cut]))
            seen[name] += 1
    assert spans  # the test covers cut factors
    for name, s in spans.items():
        s.sort()
        assert len(s) == tp and s[0][0][0] == 0 and s[-1][0][1] == s[-1][1], (name, s)
        assert all(s[i][0][1] == s[i + 1][0][0] for i in range(tp - 1)), (name, s)


def _tp_worker(rank, world_size, base, a_path, b_path, tp, ulysses):
    dims = ParallelDims(tp=tp, ulysses=ulysses)
    dims.build_mesh("cpu")
    a, b = lora.open_lora(a_path, 0.9), lora.open_lora(b_path, -0.6)
    log, flog = [], []
    model, stats = load_rank_dit(base, dims, torch.float32, adapters=[a, b], reader=recording(tp_reader(dims), log),
                            factor_reader=recording_factors(tp_factor_reader(dims), flog))
    if dims.sp_size > 1:
        apply_sequence_parallel(model, dims, stats)
    inp = inputs(SHAPES[KIND], B=1)
    out = {"tp_rank": dims.rank("tp"), "sp_rank": dims.sp_rank, "ab": k5_forward(model, inp), "log": log,
           "flog": flog}
    # Switch within the job, none -> a -> a+b, each time equal to a fresh load with that setting.
    for key, ads in [("none", []), ("a", [a]), ("ab", [a, b])]:
        slog, blog = [], []
        switch_dit_adapters(model, base, dims, ads, reader=recording(tp_reader(dims), blog),
                            factor_reader=recording_factors(tp_factor_reader(dims), slog))
        fresh, _ = load_rank_dit(base, dims, torch.float32, adapters=ads)
        out[f"equal_{key}"] = all(torch.equal(p, fresh.state_dict()[n]) for n, p in model.state_dict().items())
        out[f"slog_{key}"], out[f"blog_{key}"] = slog, blog
    switch_dit_adapters(model, base, dims, [a])
    out["a"] = k5_forward(model, inp)
    return out


@pytest.mark.parametrize("tp, ulysses", [(2, 1), (2, 2)])
def test_tensor_parallel_lora_equals_one_process(setup, tp, ulysses):
    a, b = lora.open_lora(setup["a"], 0.9), lora.open_lora(setup["b"], -0.6)
    inp = inputs(SHAPES[KIND], B=1)
    want_ab = k5_forward(load_dit(setup["base"], torch.float32, adapters=[a, b]), inp)
    want_a = k5_forward(load_dit(setup["base"], torch.float32, adapters=[a]), inp)
    results = run_distributed(_tp_worker, tp * ulysses, setup["base"], setup["a"], setup["b"], tp, ulysses)
    for r in results:
        assert rel_err(r["ab"], want_ab) <= 1e-4
        assert rel_err(r["a"], want_a) <= 1e-4
        assert r["equal_none"] and r["equal_a"] and r["equal_ab"]
    # The reads of one rank per tp coordinate (the ranks of a Ulysses group read the same slices).
    by_tp = sorted((r for r in results if r["sp_rank"] == 0), key=lambda r: r["tp_rank"])
    assert [r["tp_rank"] for r in by_tp] == list(range(tp))
    check_reads([r["log"] for r in by_tp], tp)
    check_factor_reads([r["flog"] for r in by_tp], [a, b], tp)
    # a+b -> none re-reads every touched base tensor and no factor; none -> a reads a's factor slices only.
    touched = {w for ad in (a, b) for w in ad.targets}
    for r in by_tp:
        assert r["slog_none"] == [] and sorted(n for n, *_ in r["blog_none"]) == sorted(touched)
    check_reads([r["blog_none"] for r in by_tp], tp)
    check_factor_reads([r["slog_a"] for r in by_tp], [a], tp)


# ---- bad input: one LoraError (a ValueError: exit 2) naming the problem, from headers, before any weight ----------

class Boom:
    """Unpickling this writes a file: the test sees whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def _shapes(setup):
    return lora.dit_linear_shapes(load_dit(setup["base"], torch.float32).config)


def test_bad_lora_files(setup, tmp_path):
    q = "visual_transformer_blocks.0.self_attention.to_query"
    good = {f"transformer.{q}.lora_A.weight": torch.randn(4, 64), f"transformer.{q}.lora_B.weight": torch.randn(64, 4)}

    with pytest.raises(lora.LoraError, match="nope.safetensors does not exist"):
        lora.open_lora(tmp_path / "nope.safetensors")

    marker = tmp_path / "unpickled"
    (tmp_path / "pickles").mkdir()
    for name in ("pytorch_lora_weights.safetensors", "lora.bin"):  # a pickle under either name
        torch.save({"x": Boom(marker)}, tmp_path / "pickles" / name)
        with pytest.raises(lora.LoraError, match="pickle .*never unpickled"):
            lora.open_lora(tmp_path / "pickles" / name)
    assert not marker.exists()
    only_bin = tmp_path / "binfolder"
    only_bin.mkdir()
    torch.save({"x": Boom(marker)}, only_bin / "pytorch_lora_weights.bin")
    with pytest.raises(lora.LoraError, match="no .safetensors file.*pytorch_lora_weights.bin are pickle files"):
        lora.open_lora(only_bin)
    assert not marker.exists()

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(lora.LoraError, match="not a readable safetensors file"):
        lora.open_lora(junk)

    cases = {
        "not a LoRA key": ({**good, "transformer.extra.weight": torch.zeros(2)},
                           r"keys that are not LoRA factors.*transformer\.extra\.weight"),
        "lonely factor": ({**good, f"transformer.{q[:-5]}key.lora_A.weight": torch.zeros(4, 64)},
                          r"without both factors: .*to_key \(has only A\)"),
        "rank mismatch": ({f"transformer.{q}.lora_A.weight": torch.zeros(4, 64),
                           f"transformer.{q}.lora_B.weight": torch.zeros(64, 3)},
                          r"A \(4, 64\) and B \(64, 3\); a LoRA needs A \[rank, in\] and B \[out, rank\]"),
        "dora": ({**good, f"transformer.{q}.lora_magnitude_vector": torch.ones(64)}, r"DoRA .* not supported"),
        "bias": ({**good, f"transformer.{q}.lora_B.bias": torch.ones(64)}, r"lora_bias=True\) is not supported"),
        "twice": ({**good, f"{q}.lora_down.weight": torch.zeros(4, 64)},
                  rf"transformer\.{q}\.lora_A\.weight and {q}\.lora_down\.weight are both factor A"),
    }
    for what, (tensors, message) in cases.items():
        with pytest.raises(lora.LoraError, match=message):
            lora.open_lora(_write(tmp_path / what.replace(" ", "_") / "x.safetensors", tensors))

    # the config's rank must be the factors' rank (peft would refuse to load the state dict)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})}
    with pytest.raises(lora.LoraError, match=r"to_query has rank 4 factors but its config \(header\) says r=8"):
        lora.open_lora(_write(tmp_path / "cfg" / "x.safetensors", good, meta))

    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(lora.LoraError, match="is not a finite number"):
            lora.open_lora(setup["a"], scale)

    # against the model: unknown layers, and layers of another width
    shapes = _shapes(setup)
    lora.check_fits([lora.open_lora(_write(tmp_path / "ok" / "x.safetensors", good))], shapes)
    other = {f"transformer.{q[:-9]}.to_gate.lora_A.weight": torch.zeros(2, 64),
             f"transformer.{q[:-9]}.to_gate.lora_B.weight": torch.zeros(64, 2),
             "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
             "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(lora.LoraError, match=r"match no Linear layer of the Kandinsky 5 DiT.*: "
                                             r"transformer\.blocks\.0\.attn1\.to_q\.lora_A\.weight, .*to_gate"):
        lora.check_fits([lora.open_lora(_write(tmp_path / "other" / "x.safetensors", {**good, **other}))], shapes)
    wide = {f"transformer.{q}.lora_A.weight": torch.zeros(4, 96), f"transformer.{q}.lora_B.weight": torch.zeros(96, 4)}
    with pytest.raises(lora.LoraError, match=r"\[96, 96\] update .* the layer's weight is \[64, 64\]; the LoRA was "
                                             r"made for another model size"):
        load_dit(setup["base"], torch.float32,
                                      adapters=[lora.open_lora(_write(tmp_path / "wide" / "x.safetensors", wide))])


def test_parse_lora_spec(tmp_path):
    assert lora.parse_lora_spec("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert lora.parse_lora_spec("a/b.safetensors:0.75") == (Path("a/b.safetensors"), 0.75)
    assert lora.parse_lora_spec("x:-1e-1")[1] == -0.1
    odd = tmp_path / "name:with:colons.safetensors"
    odd.write_bytes(b"")
    assert lora.parse_lora_spec(str(odd)) == (odd, 1.0)  # a path that exists keeps its colons
    with pytest.raises(lora.LoraError, match=r"--lora x:abc: scale 'abc' is not a number; use PATH or PATH:SCALE"):
        lora.parse_lora_spec("x:abc")
    for bad in ("x:nan", "x:inf", "x:-inf"):
        with pytest.raises(lora.LoraError, match="is not a finite number"):
            lora.parse_lora_spec(bad)
