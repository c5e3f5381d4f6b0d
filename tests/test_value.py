"""Value model: HF-referenced values on (image, sentence) states, packed and prefix-cached evaluation,
float32 head under bf16 compute, value checkpoints, `from_policy`."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlavaNextConfig as HFLlavaNextConfig, LlavaNextForConditionalGeneration

from tests.helpers import max_rel_err
from tests.test_llava_next import (IMAGE_TOKEN, PINS_A, VISION, images, load_ours, make_processor, mistral,
                                   randomize)
from vimar_jax.convert import spec
from vimar_jax.models import value as value_lib
from vimar_jax.models.value import ValueConfig, ValueModel
from vimar_jax.vlm import Value, load_value, load_vlm

TOL = 1e-5
LAYERS = 3
SENTENCES = [[11, 12, 13], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43, 44, 45]]
HEAD_W = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32) * 0.3
HEAD_B = np.array([0.7], np.float32)


@functools.cache
def hf_model():
    cfg = HFLlavaNextConfig(vision_config=VISION, text_config=mistral(num_hidden_layers=LAYERS),
                            image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINS_A, vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    randomize(model, 7)
    return model


def value_config_dict(value_layer=-2, **extra):
    return {**hf_model().config.to_dict(), "vimar_value": {"value_layer": value_layer, "state": "sentence", **extra}}


def value_state_dict():
    sd = {k: v.numpy() for k, v in hf_model().state_dict().items()}
    return {**sd, "value_head.weight": HEAD_W, "value_head.bias": HEAD_B}


@functools.cache
def value_model(value_layer=-2, dtype=jnp.float32) -> ValueModel:
    sd = value_state_dict()
    cs = value_lib.checkpoint_spec(value_config_dict(value_layer), set(sd))
    model = nnx.eval_shape(lambda: cs.make_module(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    spec.load_into(model, spec.assemble(cs.rules, spec.param_shapes(model), lambda k: sd[k]))
    return model


@functools.cache
def prefix():
    """One image prompt: (input_ids [1, P], pixel_values, image_sizes)."""
    proc = make_processor(PINS_A, "right")
    out = proc(images=images([(30, 50)]), text=["w1 w2 <image> w3"], return_tensors="np")
    return out["input_ids"].astype(np.int32), out["pixel_values"], out["image_sizes"]


def hf_reference(value_layer=-2) -> np.ndarray:
    """For each sentence: HF hidden_states[value_layer] at the last token of (prefix + sentence) run alone,
    through the head, in float64."""
    ids, pv, sizes = prefix()
    out = []
    for s in SENTENCES:
        full = np.concatenate([ids[0], s])[None]
        with torch.no_grad():
            hs = hf_model()(input_ids=torch.tensor(full), pixel_values=torch.tensor(pv),
                            image_sizes=torch.tensor(sizes), output_hidden_states=True).hidden_states
        h = hs[value_layer][0, -1].double().numpy()
        out.append(h @ HEAD_W[0].astype(np.float64) + float(HEAD_B[0]))
    return np.array(out)


@nnx.jit
def packed_values(model, tokens, pixel_values, gather_index, positions, segment_ids, query_index):
    return model.values(tokens, pixel_values, None, gather_index, positions, segment_ids, query_index=query_index)


def gather_index(model: ValueModel):
    ids, pv, sizes = prefix()
    return model.backbone.gather_index(sizes, pv.shape[1])


def packed_inputs(pad: int = 3):
    """[prefix, s_1, ..., s_m, padding] in one row: segment ids 0 / k / -1, suffix positions after P."""
    ids, _, _ = prefix()
    P = ids.shape[1]
    tokens, segs, pos, ends = list(ids[0]), [0] * P, list(range(P)), []
    for k, s in enumerate(SENTENCES, 1):
        tokens += s
        segs += [k] * len(s)
        pos += list(range(P, P + len(s)))
        ends.append(len(tokens) - 1)
    tokens += [0] * pad
    segs += [-1] * pad
    pos += [0] * pad
    return (np.array([tokens], np.int32), np.array([pos], np.int32), np.array([segs], np.int32),
            np.array([ends], np.int32))


# ----------------------------------------------------------------------------------------------- tests

def row_inputs():
    """One (image, sentence) state per right-padded row: (input_ids, pixel_values, image_sizes, mask)."""
    ids, pv, sizes = prefix()
    m, P, Lmax = len(SENTENCES), ids.shape[1], max(map(len, SENTENCES))
    rows = np.zeros((m, P + Lmax), np.int32)
    mask = np.zeros_like(rows)
    for i, s in enumerate(SENTENCES):
        rows[i, :P + len(s)] = np.concatenate([ids[0], s])
        mask[i, :P + len(s)] = 1
    return rows, np.repeat(pv, m, 0), np.repeat(sizes, m, 0), mask


def test_one_state_per_row_matches_hf():
    """The user API: one (image, sentence) state per right-padded row, value at each row's last token."""
    m = len(SENTENCES)
    api = Value(value_model(), value_config_dict())
    got = api.values(*row_inputs())
    assert got.shape == (m,) and got.dtype == jnp.float32
    assert max_rel_err(got, hf_reference()) <= TOL


@pytest.mark.parametrize("value_layer", [-2, -1, 1])
def test_packed_states_equal_states_run_alone(value_layer):
    """Acceptance: values of [image prefix, sentence_1..m] packed in one sequence equal each (image, sentence)
    state run alone through HF (hidden_states[value_layer] @ head)."""
    model = value_model(value_layer)
    tokens, pos, segs, ends = packed_inputs()
    _, pv, _ = prefix()
    got = packed_values(model, jnp.asarray(tokens), jnp.asarray(pv), gather_index(model), jnp.asarray(pos),
                        jnp.asarray(segs), jnp.asarray(ends))
    assert got.shape == (1, len(SENTENCES)) and got.dtype == jnp.float32
    assert max_rel_err(got[0], hf_reference(value_layer)) <= TOL


def test_prefix_cache_equals_packed_and_alone():
    """Prefill the image prefix once (cache longer than the prefix: empty slots), then value a batch of
    right-padded sentence suffixes against it with `prefix=`."""
    model = value_model()
    ids, pv, sizes = prefix()
    P, m, Lmax = ids.shape[1], len(SENTENCES), max(map(len, SENTENCES))
    cache = nnx.jit(lambda mod, i, p, g: mod.prefill(i, p, None, g, max_len=P + 5))(
        model, jnp.asarray(ids), jnp.asarray(pv), gather_index(model))
    assert cache.k.shape[0] == LAYERS - 1  # value_layer -2 needs the first L - 1 layers only
    suffix = np.zeros((m, Lmax), np.int32)
    for i, s in enumerate(SENTENCES):
        suffix[i, :len(s)] = s
    positions = np.broadcast_to(P + np.arange(Lmax, dtype=np.int32), (m, Lmax))
    last = np.array([[len(s) - 1] for s in SENTENCES], np.int32)
    fn = nnx.jit(lambda mod, t, p, c, q: mod.values(t, positions=p, prefix=c, query_index=q))
    got = fn(model, jnp.asarray(suffix), jnp.asarray(positions), cache, jnp.asarray(last))[:, 0]
    assert max_rel_err(got, hf_reference()) <= TOL

    tokens, pos, segs, ends = packed_inputs()
    packed = packed_values(model, jnp.asarray(tokens), jnp.asarray(pv), gather_index(model), jnp.asarray(pos),
                           jnp.asarray(segs), jnp.asarray(ends))[0]
    assert max_rel_err(got, packed) <= TOL


def test_head_is_float32_under_bf16_compute():
    model = value_model(dtype=jnp.bfloat16)
    assert model.value_head.kernel[...].dtype == jnp.float32 and model.value_head.bias[...].dtype == jnp.float32
    assert model.backbone.decoder.embed_tokens[...].dtype == jnp.bfloat16
    tokens, pos, segs, ends = packed_inputs()
    _, pv, _ = prefix()
    args = (jnp.asarray(tokens), jnp.asarray(pv), None, gather_index(model), jnp.asarray(pos), jnp.asarray(segs))

    @nnx.jit
    def run(mod, *a):
        h, _ = mod.hidden(*a)
        return mod.values(*a, query_index=jnp.asarray(ends)), h[0, ends[0]]

    got, h = run(model, *args)
    assert h.dtype == jnp.bfloat16 and got.dtype == jnp.float32
    # The head applied in float64 to the bf16 hidden states: a bf16 head would be off by ~1e-3.
    want = np.asarray(h, np.float64) @ HEAD_W[0].astype(np.float64) + float(HEAD_B[0])
    assert max_rel_err(got[0], want) <= 1e-6
    assert max_rel_err(got[0], hf_reference()) <= 0.1   # and still close to the fp32 values


def test_value_checkpoint_loads_in_ours_and_hf(tmp_path):
    hf_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.update({"value_head.weight": HEAD_W, "value_head.bias": HEAD_B})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vimar_value"] = {"value_layer": -2, "state": "sentence", "stats": {"p50": 0.1}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    api = load_value(tmp_path)
    assert api.config.value_layer == -2 and api.config.extra == {"stats": {"p50": 0.1}}
    assert api.config.hf_entry() == cfg["vimar_value"]
    assert max_rel_err(api.values(*row_inputs()), hf_reference()) <= TOL
    # The directory is still an HF LLaVA-NeXT checkpoint (value_head.* ignored), and our VLM loads it too.
    ids, pv, sizes = prefix()
    rows = np.stack([np.concatenate([ids[0], SENTENCES[1]])])
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(rows), pixel_values=torch.tensor(pv), image_sizes=torch.tensor(sizes))
        ref = hf_model()(**kw).logits.numpy()
        assert np.array_equal(again(**kw).logits.numpy(), ref)
    assert max_rel_err(load_vlm(tmp_path).logits(rows, pv, sizes), ref) <= TOL


def test_from_policy_copies_backbone_and_adds_fresh_head():
    policy = load_ours(hf_model())
    a = ValueModel.from_policy(policy, value_layer=-2, rng=1)
    b = ValueModel.from_policy(policy, value_layer=-2, rng=2)
    ours = nnx.to_flat_state(nnx.state(a.backbone, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(policy, nnx.Param)))
    assert len(ours) == len(theirs)
    for path, var in ours:
        assert np.array_equal(var[...], theirs[path][...])
    ka, kb = np.asarray(a.value_head.kernel[...]), np.asarray(b.value_head.kernel[...])
    assert ka.shape == (64, 1) and ka.dtype == np.float32 and np.abs(ka).max() > 0 and not np.array_equal(ka, kb)
    assert np.array_equal(np.asarray(a.value_head.bias[...]), [0.0])
    # Training the value model leaves the policy alone.
    a.backbone.image_newline[...] = a.backbone.image_newline[...] + 1.0
    assert np.array_equal(policy.image_newline[...], theirs[("image_newline",)][...])
    assert a.config.num_layers == LAYERS - 1


def test_value_config_errors():
    with pytest.raises(ValueError, match="value_layer"):
        ValueConfig.from_hf(value_config_dict(value_layer=LAYERS + 1))
    with pytest.raises(ValueError, match="vimar_value"):
        ValueConfig.from_hf(hf_model().config.to_dict())
    with pytest.raises(ValueError, match="state"):
        ValueConfig.from_hf({**value_config_dict(), "vimar_value": {"state": "paragraph"}})
    assert ValueConfig.from_hf(value_config_dict(-1)).num_layers is None
    assert ValueConfig.from_hf(value_config_dict(0)).num_layers == 0
    sd = {k: torch.tensor(v) for k, v in value_state_dict().items() if k != "value_head.bias"}
    cs = value_lib.checkpoint_spec(value_config_dict(), set(sd))
    with pytest.raises(spec.ConversionError, match="value_head.bias"):
        spec.from_torch_state_dict(nnx.eval_shape(lambda: cs.make_module(rngs=nnx.Rngs(0))), cs.rules, sd)
