"""The converter: safetensors streaming, HF <-> vimar round trips, load_module (with and without a mesh),
bad-input errors, and the `vimar` CLI. A toy 2-layer stacked family (registered under the model_type
"vimar_toy") exercises the machinery; real families are tested further down when their modules exist."""

import dataclasses
import functools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from vimar_jax import cli
from vimar_jax.convert import io, registry
from vimar_jax.convert import spec as S
from vimar_jax.convert.spec import ConversionError
from vimar_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# toy family


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int

    @classmethod
    def from_hf(cls, d):
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


class ToyLayers(nnx.Module):
    def __init__(self, c: ToyConfig, *, param_dtype, rngs):
        L, E, H, D, M = c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
        init = nnx.initializers.zeros  # values come from checkpoints; zeros keep construction cheap
        self.norm = nnx.Param(jnp.ones((L, E), param_dtype), axes=("layers", "norm"))
        self.q_proj = nnx.Param(init(rngs.params(), (L, E, H, D), param_dtype),
                                axes=("layers", "embed", "heads", "head_dim"))
        self.q_bias = nnx.Param(jnp.zeros((L, H, D), param_dtype), axes=("layers", "heads", "head_dim"))
        self.up_proj = nnx.Param(init(rngs.params(), (L, E, M), param_dtype), axes=("layers", "embed", "mlp"))


class Toy(nnx.Module):
    def __init__(self, c: ToyConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        init = nnx.initializers.zeros
        self.embed = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype),
                               axes=("vocab", "embed"))
        self.layers = ToyLayers(c, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), param_dtype), axes=("norm",))
        self.lm_head = nnx.Param(init(rngs.params(), (c.hidden_size, c.vocab_size), param_dtype),
                                 axes=("embed", "vocab"))
        # non-parameter state, like a RoPE table: load_module must rebuild it
        self.inv_freq = nnx.Variable(1.0 / (10.0 ** jnp.arange(c.head_dim, dtype=jnp.float32)))
        self.dtype = dtype


def toy_rules(c: ToyConfig, prefix="model."):
    E, H, D, M, V = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.vocab_size
    rules = [S.TensorRule(f"{prefix}embed_tokens.weight", ("embed",), (V, E))]
    for i in range(c.num_layers):
        p = f"{prefix}layers.{i}."
        rules += [
            S.reshaped(p + "input_layernorm.weight", ("layers", "norm"), (E,), (E,), i),
            S.linear(p + "self_attn.q_proj.weight", ("layers", "q_proj"), (H, D), (E,), i),
            S.reshaped(p + "self_attn.q_proj.bias", ("layers", "q_bias"), (H * D,), (H, D), i),
            S.linear(p + "mlp.up_proj.weight", ("layers", "up_proj"), (M,), (E,), i),
        ]
    rules += [S.TensorRule(f"{prefix}norm.weight", ("final_norm",), (E,)),
              S.linear("lm_head.weight", ("lm_head",), (V,), (E,))]
    return rules


def toy_checkpoint_spec(config, hf_keys):
    c = ToyConfig.from_hf(config)
    prefix = "language_model.model." if any(k.startswith("language_model.") for k in hf_keys) else "model."
    return S.CheckpointSpec("toy", functools.partial(Toy, c), toy_rules(c, prefix), {"prefix": prefix})


@pytest.fixture(autouse=True, scope="module")
def toy_family():
    registry.register("toy", toy_checkpoint_spec, model_types=("vimar_toy",))
    yield
    registry.unregister("toy")


TOY = dict(model_type="vimar_toy", vocab_size=11, hidden_size=8, num_heads=2, head_dim=4,
           intermediate_size=12, num_layers=2)
SIDE_FILES = {"tokenizer.json": '{"model": "toy"}', "tokenizer_config.json": '{"chat_template": "x"}',
              "chat_template.jinja": "{{ messages }}", "preprocessor_config.json": '{"size": 4}'}


def toy_tensors(rng, dtype=np.float32, config=TOY):
    c = ToyConfig.from_hf(config)
    E, H, D, M, V = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.vocab_size
    shapes = {"model.embed_tokens.weight": (V, E)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (E,), p + "self_attn.q_proj.weight": (H * D, E),
                   p + "self_attn.q_proj.bias": (H * D,), p + "mlp.up_proj.weight": (M, E)}
    shapes |= {"model.norm.weight": (E,), "lm_head.weight": (V, E)}
    return {k: rng.standard_normal(s).astype(np.float32).astype(dtype) for k, s in shapes.items()}


def write_hf(path, tensors, *, config=TOY, shards=1, metadata={"format": "pt"}):
    """An HF-style directory written with the reference safetensors writer (not ours)."""
    path = Path(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
        return path
    weight_map = {}
    for j, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[i]: tensors[keys[i]] for i in part}, str(path / name), metadata=metadata)
        weight_map |= {keys[i]: name for i in part}
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                   indent=2, sort_keys=True) + "\n")
    return path


def expected_ours(t, config=TOY):
    """Our parameters computed by hand from HF tensors (kernels [in, out], heads split out, stacked)."""
    c = ToyConfig.from_hf(config)
    E, H, D = c.hidden_size, c.num_heads, c.head_dim
    lay = lambda name, f: np.stack([f(t[f"model.layers.{i}.{name}"]) for i in range(c.num_layers)])  # noqa: E731
    return {
        "embed": t["model.embed_tokens.weight"],
        "layers.norm": lay("input_layernorm.weight", lambda w: w),
        "layers.q_proj": lay("self_attn.q_proj.weight", lambda w: w.T.reshape(E, H, D)),
        "layers.q_bias": lay("self_attn.q_proj.bias", lambda b: b.reshape(H, D)),
        "layers.up_proj": lay("mlp.up_proj.weight", lambda w: w.T),
        "final_norm": t["model.norm.weight"],
        "lm_head": t["lm_head.weight"].T,
    }


def convert(*argv):
    return cli.main(["convert", *map(str, argv)])


def assert_same_dir_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


# ----------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_byte_equal(tmp_path, rng, dtype, shards):
    t = toy_tensors(rng, dtype)
    hf = write_hf(tmp_path / "hf", t, shards=shards)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert(hf, ours, "--max-shard-gb", 1e-6) == 0  # 1 kB files: our side is sharded too
    assert convert("--to-hf", ours, back) == 0
    # Every file (safetensors, index, tokenizer & config) comes back byte for byte.
    assert_same_dir_files(hf, back)

    # Our side: dotted keys, source dtype kept, values as computed by hand.
    want = expected_ours(t)
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    got = {}
    for name in set(index["weight_map"].values()):
        got |= load_file(str(ours / name))
    for k, v in want.items():
        assert got[k].dtype == np.dtype(dtype) and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8), err_msg=k)
    meta = json.loads((ours / "vimar.json").read_text())
    assert meta["kind"] == "toy" and meta["format_version"] == io.FORMAT_VERSION
    assert meta["layout"] == {"prefix": "model."}
    src_file = {k: (hf / "model.safetensors.index.json").exists() and
                json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][k] or "model.safetensors"
                for k in t}
    for k in t:
        assert meta["hf"]["tensors"][k]["file"] == src_file[k]
        assert meta["hf"]["tensors"][k]["dtype"] == {np.float32: "F32", ml_dtypes.bfloat16: "BF16",
                                                     np.float16: "F16"}[dtype]
    assert all(f["metadata"] == {"format": "pt"} for f in meta["hf"]["files"])
    for name, text in SIDE_FILES.items():
        assert (ours / name).read_text() == text


def test_cast_up_then_back_is_lossless_and_cast_down_rounds(tmp_path, rng):
    t = toy_tensors(rng, ml_dtypes.bfloat16)
    hf = write_hf(tmp_path / "hf", t)
    assert convert(hf, tmp_path / "f32", "--dtype", "float32") == 0
    ours = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert ours["layers.q_proj"].dtype == np.float32
    assert convert("--to-hf", tmp_path / "f32", tmp_path / "back") == 0
    assert_same_dir_files(hf, tmp_path / "back")

    t32 = toy_tensors(np.random.default_rng(1))
    hf32 = write_hf(tmp_path / "hf32", t32)
    assert convert(hf32, tmp_path / "bf", "--dtype", "bfloat16") == 0
    ours = load_file(str(tmp_path / "bf" / "model.safetensors"))
    want = expected_ours(t32)
    for k, v in want.items():
        assert ours[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(ours[k], v.astype(ml_dtypes.bfloat16), err_msg=k)


def test_reader_matches_reference_reader(tmp_path, rng):
    """Our mmap reader and writer agree with the safetensors library on every dtype, incl. empty tensors."""
    t = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16), "b": np.arange(7, dtype=np.int64),
         "c": np.zeros((0, 4), np.float16), "d": np.array(2.5, np.float32), "é": np.array([True, False])}
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"k": "ü"})
    with io.SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata == {"k": "ü"}
        for k, v in t.items():
            got = f.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(got, v)
            if v.ndim and v.shape[0]:
                with f.view(k, index=v.shape[0] - 1) as row:
                    np.testing.assert_array_equal(row, v[-1])
        order = f.keys()
    out = [io.OutTensor(k, io.dtype_name(t[k].dtype), t[k].shape, lambda k=k: t[k]) for k in order]
    io.write_safetensors(tmp_path / "ours.safetensors", out, {"k": "ü"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------
# load_module


def direct_load(t, dtype=jnp.float32):
    """The in-memory path: concrete module + spec.assemble over the HF tensors."""
    module = Toy(ToyConfig.from_hf(TOY), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    S.load_into(module, S.assemble(toy_rules(ToyConfig.from_hf(TOY)), S.param_shapes(module), t.__getitem__))
    return module


def flat_params(module):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    t = toy_tensors(np.random.default_rng(3), ml_dtypes.bfloat16)
    hf = write_hf(tmp / "hf", t, shards=2)
    assert convert(hf, tmp / "ours") == 0
    return t, hf, tmp / "ours"


def test_load_module_equals_direct_load(toy_dirs):
    t, hf, ours = toy_dirs
    want = flat_params(direct_load(t))
    for path in (hf, ours):
        module, config = io.load_module(path)
        assert config == TOY and isinstance(module, Toy)
        got = flat_params(module)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{path}: {k}")
        np.testing.assert_array_equal(module.inv_freq.get_value(), np.float32([1.0, 0.1, 0.01, 0.001]))
    # and the values are the hand-computed layout, not just self-consistent
    for k, v in expected_ours(t).items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.astype(np.float32), err_msg=k)


def test_load_module_dtypes(toy_dirs):
    _, hf, ours = toy_dirs
    module, _ = io.load_module(ours, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(module).values())
    module, _ = io.load_module(hf, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    assert all(v.dtype == jnp.float16 for v in flat_params(module).values())


def test_load_module_onto_mesh(toy_dirs):
    t, hf, ours = toy_dirs
    mesh = make_mesh(fsdp=2, tensor=2)
    want_specs = {
        "embed": P(None, "fsdp"),                      # vocab 11 is not divisible by tensor=2: replicated
        "layers.norm": P(None, None),
        "layers.q_proj": P(None, "fsdp", "tensor", None),
        "layers.q_bias": P(None, "tensor", None),
        "layers.up_proj": P(None, "fsdp", "tensor"),
        "final_norm": P(None),
        "lm_head": P("fsdp", None),
    }
    want = expected_ours(t)
    for path in (hf, ours):
        module, _ = io.load_module(path, mesh=mesh)
        got = flat_params(module)
        for k, spec in want_specs.items():
            assert got[k].sharding.mesh.shape == mesh.shape and got[k].sharding.spec == spec, (k, got[k].sharding)
            assert len(got[k].sharding.device_set) == 4
            np.testing.assert_array_equal(np.asarray(got[k]), want[k].astype(np.float32), err_msg=k)
        # one shard of q_proj holds exactly its quarter
        shard = next(s for s in got["layers.q_proj"].addressable_shards if s.index[1].start == 4
                     and s.index[2].start == 1)
        np.testing.assert_array_equal(np.asarray(shard.data), want["layers.q_proj"][:, 4:, 1:].astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# bad inputs: one clear error naming the culprit, output untouched


def rewrite(path, t, **kw):
    import shutil
    shutil.rmtree(path)
    return write_hf(path, t, **kw)


def expect_failure(tmp_path, hf, *needles, capsys=None):
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        io.convert_to_vimar(hf, out)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left
    # the same through the CLI: exit status 1, message on stderr
    if capsys is not None:
        capsys.readouterr()
        assert convert(hf, out) == 1
        err = capsys.readouterr().err
        assert err.startswith("vimar convert: error: ") and all(n in err for n in needles)
        assert not out.exists()
    with pytest.raises(ConversionError):
        io.load_module(hf)
    return str(e.value)


def test_missing_and_extra_keys(tmp_path, rng, capsys):
    t = toy_tensors(rng)
    hf = write_hf(tmp_path / "hf", {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    expect_failure(tmp_path, hf, "missing 1 tensor", "model.layers.1.mlp.up_proj.weight", capsys=capsys)
    rewrite(hf, t | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)})
    expect_failure(tmp_path, hf, "1 unexpected tensor", "model.layers.0.self_attn.rotary_emb.inv_freq",
                   capsys=capsys)


def test_misshaped_tensor(tmp_path, rng, capsys):
    t = toy_tensors(rng)
    t["model.layers.1.self_attn.q_proj.bias"] = np.zeros(9, np.float32)
    hf = write_hf(tmp_path / "hf", t, shards=2)
    expect_failure(tmp_path, hf, "'model.layers.1.self_attn.q_proj.bias'", "[9]", "[8]", capsys=capsys)


def test_config_mismatching_weights(tmp_path, rng):
    t = toy_tensors(rng)
    hf = write_hf(tmp_path / "hf", t, config=TOY | {"hidden_size": 16})
    expect_failure(tmp_path, hf, "config and weights do not match", "'model.embed_tokens.weight'", "[11, 8]",
                   "[11, 16]")
    rewrite(hf, t, config=TOY | {"num_layers": 3})
    expect_failure(tmp_path, hf, "missing 4 tensor", "model.layers.2.mlp.up_proj.weight")


def test_corrupt_and_truncated_safetensors(tmp_path, rng, capsys):
    t = toy_tensors(rng)
    hf = write_hf(tmp_path / "hf", t, shards=2)
    shard = hf / "model-00002-of-00002.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    msg = expect_failure(tmp_path, hf, "corrupt safetensors file", str(shard), "truncated", capsys=capsys)
    header = json.loads(good[8:8 + struct.unpack("<Q", good[:8])[0]])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    assert f"tensor {last!r}" in msg  # the last tensor is the one cut short
    shard.write_bytes(good[:8] + b"}{" + good[10:])
    expect_failure(tmp_path, hf, str(shard), "header is not valid JSON")
    shard.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    expect_failure(tmp_path, hf, str(shard), "header length")
    shard.write_bytes(good[:3])
    expect_failure(tmp_path, hf, str(shard), "too short")
    shard.write_bytes(good + b"extra")
    expect_failure(tmp_path, hf, str(shard), "5 unexpected bytes")
    shard.unlink()
    expect_failure(tmp_path, hf, str(shard), "does not exist")


def test_not_a_checkpoint(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    expect_failure(tmp_path, d, str(d), "no config.json", capsys=capsys)
    (d / "config.json").write_text(json.dumps(TOY))
    expect_failure(tmp_path, d, str(d), "no model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    expect_failure(tmp_path, d, "pytorch_model.bin", "never loaded")
    (d / "config.json").write_text("{not json")
    expect_failure(tmp_path, d, "config.json", "not valid JSON")
    expect_failure(tmp_path, tmp_path / "nowhere", "nowhere", "not a directory")
    save_file({"x": np.ones(1, np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    expect_failure(tmp_path, d, "model_type 'gpt2' is not supported")


def test_output_dir_rules(tmp_path, rng, capsys):
    t = toy_tensors(rng)
    hf = write_hf(tmp_path / "hf", t)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(hf, out) == 1
    assert "not empty" in capsys.readouterr().err and str(out) in str(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite with a failing input leaves the old directory as it was
    bad = write_hf(tmp_path / "bad", {k: v for k, v in t.items() if k != "lm_head.weight"})
    assert convert(bad, out, "--overwrite") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite with a good input replaces it
    assert convert(hf, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "vimar.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "hf", "out"]  # no temp dirs left
    # an empty existing directory is fine; the input itself is never an output
    (tmp_path / "empty").mkdir()
    assert convert(hf, tmp_path / "empty") == 0
    assert convert(hf, hf, "--overwrite") == 1
    assert "overlaps the input" in capsys.readouterr().err
    # --to-hf needs a vimar directory
    assert convert("--to-hf", hf, tmp_path / "x") == 1
    assert "no vimar.json" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_converted_dir_checks(tmp_path, rng):
    hf = write_hf(tmp_path / "hf", toy_tensors(rng))
    ours = tmp_path / "ours"
    assert convert(hf, ours) == 0
    (ours / "config.json").write_text(json.dumps(TOY | {"intermediate_size": 6}))
    with pytest.raises(ConversionError, match="model.layers.0.mlp.up_proj.weight.*config and weights"):
        io.load_module(ours)
    (ours / "config.json").write_text(json.dumps(TOY))
    t = load_file(str(ours / "model.safetensors"))
    del t["final_norm"]
    save_file(t, str(ours / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing 1 tensor.*'final_norm'"):
        io.load_module(ours)
    with pytest.raises(ConversionError, match="'final_norm'"):
        io.convert_to_hf(ours, tmp_path / "back")
    assert not (tmp_path / "back").exists()
    meta = json.loads((ours / "vimar.json").read_text())
    del meta["hf"]["files"][0]["tensors"][0]
    (ours / "vimar.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="vimar.json is malformed"):
        io.convert_to_hf(ours, tmp_path / "back")


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "convert" in out and "VERB" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--help"])
    assert "--to-hf" in capsys.readouterr().out


def test_cli_progress_and_summary(tmp_path, rng, capsys):
    hf = write_hf(tmp_path / "hf", toy_tensors(rng))
    assert convert(hf, tmp_path / "o", "--progress") == 0
    cap = capsys.readouterr()
    n = len(toy_tensors(rng))
    assert f"{n}/{n}" in cap.err  # tqdm over HF tensors
    assert f"{n} tensors" in cap.out and "GB/s" in cap.out


def test_cli_subprocess(tmp_path, rng):
    """`python -m vimar_jax.cli` with a toy family registered through a sitecustomize-free shim."""
    hf = write_hf(tmp_path / "hf", toy_tensors(rng))
    shim = ("import sys; sys.path.insert(0, %r); import tests.test_convert as t; "
            "from vimar_jax.convert import registry; registry.register('toy', t.toy_checkpoint_spec, ('vimar_toy',)); "
            "import runpy; sys.argv = ['vimar_jax.cli'] + sys.argv[1:]; runpy.run_module('vimar_jax.cli', run_name='__main__')"
            % str(ROOT))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", shim, "convert", str(hf), str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tensors" in r.stdout and (tmp_path / "o" / "vimar.json").exists()
    r = subprocess.run([sys.executable, "-m", "vimar_jax.cli", "convert", str(tmp_path / "missing"),
                        str(tmp_path / "o2")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "not a directory" in r.stderr


# ----------------------------------------------------------------------------------------------------
# real families: HF torch checkpoints written by `save_pretrained`

def tiny_llava(seed=0):
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
    tc = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
                          image_token_index=60, image_seq_length=4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def save_hf(model, path, dtype="float32", shard="200KB"):
    import copy

    import torch

    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path, max_shard_size=shard)
    (Path(path) / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return Path(path)


def direct_params(abstract, rules, tensors):
    """The in-memory path: `spec.assemble` over all tensors at once -> {dotted path: array}."""
    get = lambda k: tensors[k].detach().float().numpy() if hasattr(tensors[k], "detach") else tensors[k]  # noqa
    return {".".join(p): v for p, v in S.assemble(rules, S.param_shapes(abstract), get).items()}


def llava_direct(like, hf_model):
    """Direct load of a torch LLaVA-NeXT (its state dict is in the nested key layout)."""
    from vimar_jax.models import llava_next

    sd = hf_model.state_dict()
    rules = llava_next.llava_next_rules(like.config, llava_next.detect_layout(sd))
    return direct_params(nnx.eval_shape(lambda: llava_next.LlavaNext(like.config, rngs=nnx.Rngs(0))), rules, sd)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("vimar_jax.models.llava_next")
    tmp = tmp_path_factory.mktemp("llava")
    m = tiny_llava()
    return m, save_hf(m, tmp / "f32", shard="20KB"), save_hf(m, tmp / "bf16", "bfloat16", shard="20KB")


def test_llava_next_round_trip_byte_equal(llava, tmp_path):
    _, *dirs = llava
    for hf in dirs:
        assert len(list(hf.glob("model-*.safetensors"))) > 1  # sharded by save_pretrained
        ours, back = tmp_path / f"{hf.name}_ours", tmp_path / f"{hf.name}_back"
        assert convert(hf, ours) == 0
        assert json.loads((ours / "vimar.json").read_text())["kind"] == "llava_next"
        assert (ours / "chat_template.jinja").exists() and (ours / "generation_config.json").exists()
        assert convert("--to-hf", ours, back) == 0
        assert_same_dir_files(hf, back)


def test_llava_next_load_module(llava, tmp_path):
    m, hf32, hf16 = llava
    from vimar_jax.models.llava_next import LlavaNext

    assert convert(hf32, tmp_path / "ours") == 0
    direct = None
    for path in (hf32, tmp_path / "ours"):
        module, config = io.load_module(path)
        assert isinstance(module, LlavaNext) and config["model_type"] == "llava_next"
        if direct is None:
            direct = llava_direct(module, m)
        got = flat_params(module)
        assert set(got) == set(direct)
        for k in direct:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(direct[k]), err_msg=k)
    # the loaded model computes what HF computes (text-only path through the decoder)
    import torch

    ids = np.array([[1, 5, 9, 33, 2, 17, 40]])
    with torch.no_grad():
        h = m.model.language_model(input_ids=torch.tensor(ids)).last_hidden_state
        ref = m.lm_head(h).numpy()
    hidden, _ = module.decoder(module.decoder.embed(jnp.asarray(ids)), positions=jnp.arange(7)[None])
    from tests.helpers import max_rel_err
    assert max_rel_err(module.decoder.logits(hidden), ref) <= 1e-5
    # bf16 checkpoint, bf16 compute: parameters are the bf16 weights exactly
    module, _ = io.load_module(hf16, dtype=jnp.bfloat16)
    got = flat_params(module)
    for k, v in direct.items():
        assert got[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v).astype(ml_dtypes.bfloat16), err_msg=k)


def test_llava_next_onto_mesh(llava):
    m, hf32, _ = llava
    mesh = make_mesh(fsdp=2, tensor=2)
    module, _ = io.load_module(hf32, mesh=mesh)
    got = flat_params(module)
    direct = llava_direct(module, m)
    expect = {"decoder.layers.q_proj": P(None, "fsdp", "tensor", None),
              "decoder.layers.down_proj": P(None, "tensor", "fsdp"),
              "decoder.embed_tokens": P("tensor", "fsdp"),
              "decoder.lm_head": P("fsdp", "tensor")}
    for k, spec in expect.items():
        assert got[k].sharding.spec == spec, (k, got[k].sharding.spec)
    for k in direct:
        assert got[k].sharding.mesh.shape == mesh.shape, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(direct[k]), err_msg=k)


def test_value_checkpoint(llava, tmp_path):
    pytest.importorskip("vimar_jax.models.value")
    from vimar_jax.models.value import ValueModel

    m, hf32, _ = llava
    vdir = tmp_path / "value"
    vdir.mkdir()
    tensors = {}
    for f in hf32.glob("model-*.safetensors"):
        tensors |= load_file(str(f))
    E = m.config.text_config.hidden_size
    w = np.random.default_rng(0).standard_normal((1, E)).astype(np.float32)
    tensors |= {"value_head.weight": w, "value_head.bias": np.array([0.25], np.float32)}
    save_file({k: v.astype(ml_dtypes.bfloat16) if k.startswith("language_model") else v
               for k, v in tensors.items()}, str(vdir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf32 / "config.json").read_text()) | {"vimar_value": {"value_layer": -2, "state": "sentence"}}
    (vdir / "config.json").write_text(json.dumps(config))
    assert convert(vdir, tmp_path / "ours") == 0 and convert("--to-hf", tmp_path / "ours", tmp_path / "back") == 0
    assert_same_dir_files(vdir, tmp_path / "back")
    for path in (vdir, tmp_path / "ours"):
        module, _ = io.load_module(path, dtype=jnp.bfloat16)
        assert isinstance(module, ValueModel)
        head = flat_params(module)
        assert head["value_head.kernel"].dtype == jnp.float32  # the head stays float32
        np.testing.assert_array_equal(np.asarray(head["value_head.kernel"]), w.T)
        np.testing.assert_array_equal(np.asarray(head["value_head.bias"]), [0.25])


def test_clip_with_position_id_buffers(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vimar_jax.models.clip")
    from transformers import CLIPConfig, CLIPModel

    from vimar_jax.models import clip

    cfg = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=12),
                     vision_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     projection_dim=8)
    torch.manual_seed(0)
    m = CLIPModel(cfg).eval()
    hf = save_hf(m, tmp_path / "hf", "float16", shard="10GB")
    # older checkpoints carry int64 position_ids buffers, which map onto no parameter
    t = load_file(str(hf / "model.safetensors"))
    t |= {"text_model.embeddings.position_ids": np.arange(12, dtype=np.int64)[None],
          "vision_model.embeddings.position_ids": np.arange(5, dtype=np.int64)[None]}
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert convert(hf, tmp_path / "ours", "--dtype", "float32") == 0
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert ours["hf_buffer/text_model.embeddings.position_ids"].dtype == np.int64  # never cast
    assert convert("--to-hf", tmp_path / "ours", tmp_path / "back") == 0
    assert_same_dir_files(hf, tmp_path / "back")
    module, _ = io.load_module(tmp_path / "ours")
    assert isinstance(module, clip.CLIPModel)
    cfg = clip.CLIPConfig.from_hf(m.config.to_dict())
    want = direct_params(nnx.eval_shape(lambda: clip.CLIPModel(cfg, rngs=nnx.Rngs(0))), clip.clip_rules(cfg),
                         {k: v.half() for k, v in m.state_dict().items()})
    got = flat_params(module)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_qwen2_tied_decoder(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vimar_jax.models.decoder")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     tie_word_embeddings=True)).eval()
    hf = save_hf(m, tmp_path / "hf", "bfloat16", shard="4KB")
    assert "lm_head.weight" not in json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert convert(hf, tmp_path / "ours", "--max-shard-gb", 2e-6) == 0
    assert convert("--to-hf", tmp_path / "ours", tmp_path / "back") == 0
    assert_same_dir_files(hf, tmp_path / "back")
    module, _ = io.load_module(tmp_path / "ours")
    got = flat_params(module)
    assert "lm_head" not in got
    sd = m.state_dict()
    np.testing.assert_array_equal(
        np.asarray(got["layers.q_bias"][1]),
        sd["model.layers.1.self_attn.q_proj.bias"].to(torch.bfloat16).float().numpy().reshape(4, 4))
    np.testing.assert_array_equal(
        np.asarray(got["layers.k_proj"][0]),
        sd["model.layers.0.self_attn.k_proj.weight"].to(torch.bfloat16).float().numpy().T.reshape(16, 2, 4))
