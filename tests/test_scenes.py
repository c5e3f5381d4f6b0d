"""Tiny world: scenes match their drawings, determinism, captions, and the word-level tokenizers."""

import dataclasses
import json
import re

import numpy as np
import pytest

from vimar_jax.data import scenes as S
from vimar_jax.data import tiny_tokenizer as T

CFG = S.SceneConfig()
N_SCENES = 150


def _pixels(img) -> np.ndarray:
    return np.asarray(img, np.int32)


@pytest.fixture(scope="module")
def many():
    return S.scenes(11, N_SCENES)


def test_ground_truth_matches_drawing(many):
    """Each object drawn alone lands where, how big and in the colour the scene says; in the full scene
    each keeps >= min_visible of its pixels, pairs overlap <= max_overlap, one object per cell."""
    for scene in many:
        w, h = scene.width, scene.height
        assert CFG.min_side <= w <= CFG.max_side and CFG.min_side <= h <= CFG.max_side
        assert max(w / h, h / w) <= CFG.max_aspect
        assert 1 <= len(scene.objects) <= 6
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        empty = _pixels(S.render(dataclasses.replace(scene, objects=())))
        assert empty.max() < 100  # the background is dark: no object colour is confusable with it
        full = _pixels(S.render(scene))
        assert full.shape == (h, w, 3)
        drawn = []
        for obj in scene.objects:
            alone = _pixels(S.render(dataclasses.replace(scene, objects=(obj,))))
            mask = np.any(alone != empty, axis=-1)
            drawn.append(mask)
            ys, xs = np.nonzero(mask)
            assert len(ys) >= 12, (obj, len(ys))
            # Inside the object's circle, around the centre it claims, in the grid cell it claims.
            assert np.hypot(xs + 0.5 - obj.cx, ys + 0.5 - obj.cy).max() <= obj.radius + 1.5
            assert int(obj.cx * 3 // w) == obj.col and int(obj.cy * 3 // h) == obj.row
            # Near its cell's centre: within max_shift of the cell's width and height (3 decimals stored).
            assert abs(obj.cx - (obj.col + 0.5) * w / 3) <= CFG.max_shift * w / 3 + 1e-3
            assert abs(obj.cy - (obj.row + 0.5) * h / 3) <= CFG.max_shift * h / 3 + 1e-3
            assert int((xs.mean() + 0.5) * 3 // w) == obj.col and int((ys.mean() + 0.5) * 3 // h) == obj.row
            # Size class from the radius, relative to the smaller side of a cell.
            rel = obj.radius / min(w / 3, h / 3)
            lo, hi = CFG.small_radius if obj.size == "small" else CFG.large_radius
            assert lo - 1e-3 <= rel <= hi + 1e-3
            # Colour: the drawn pixels average to the object's rgb, whose nearest palette colour is its name.
            assert np.abs(alone[mask].mean(0) - np.array(obj.rgb)).max() < 3.0
            nearest = min(S.COLORS, key=lambda c: np.sum((np.array(S.COLORS[c]) - obj.rgb) ** 2))
            assert nearest == obj.color
            assert alone[mask].max(-1).min() > 120  # bright against the dark background
            # The mask the generator reasons with is what is drawn.
            np.testing.assert_array_equal(S.object_mask(obj, w, h), mask)
        areas = [m.sum() for m in drawn]
        for i in range(len(drawn)):
            later = np.zeros((h, w), bool)
            for m in drawn[i + 1:]:
                later |= m
            visible = drawn[i] & ~later
            assert visible.sum() >= CFG.min_visible * areas[i]
            # What is visible of object i in the full scene is object i's colour.
            alone = _pixels(S.render(dataclasses.replace(scene, objects=(scene.objects[i],))))
            np.testing.assert_array_equal(full[visible], alone[visible])
            for j in range(i + 1, len(drawn)):
                assert (drawn[i] & drawn[j]).sum() <= CFG.max_overlap * min(areas[i], areas[j])
        background = ~np.logical_or.reduce(drawn)
        np.testing.assert_array_equal(full[background], empty[background])


def test_variety(many):
    more = many + S.scenes(12, 150)
    objs = [o for s in more for o in s.objects]
    assert {o.shape for o in objs} == set(S.SHAPES) and len(S.SHAPES) >= 6
    assert {o.color for o in objs} == set(S.COLORS) and len(S.COLORS) >= 6
    assert {o.size for o in objs} == set(S.SIZES)
    assert {o.cell for o in objs} == {(r, c) for r in range(3) for c in range(3)}
    assert {len(s.objects) for s in more} == set(range(1, 7))
    ratios = [s.width / s.height for s in more]
    assert min(ratios) < 0.5 and max(ratios) > 2.0
    assert len({(s.width, s.height) for s in more}) > 100


def test_config_ranges_are_parameters():
    cfg = S.SceneConfig(min_side=60, max_side=70, max_aspect=1.1, min_objects=2, max_objects=3)
    for s in S.scenes(3, 30, cfg):
        assert 60 <= s.width <= 70 and 60 <= s.height <= 70 and 2 <= len(s.objects) <= 3
    with pytest.raises(ValueError, match="min_side"):
        S.SceneConfig(min_side=100, max_side=50)
    with pytest.raises(ValueError, match="max_shift"):
        S.SceneConfig(max_shift=0.6)
    # max_shift is a parameter: free centres move objects well away from the cell centre.
    free = S.SceneConfig(max_shift=0.5)
    offsets = [abs(o.cx - (o.col + 0.5) * s.width / 3) / (s.width / 3)
               for s in S.scenes(3, 30, free) for o in s.objects]
    assert max(offsets) > 0.1
    impossible = S.SceneConfig(min_objects=6, small_radius=(1.5, 1.6), large_radius=(1.5, 1.6), spill=0.0)
    with pytest.raises(ValueError, match="overlap/visibility limits"):
        S.scene_at(0, 0, impossible)


def test_deterministic():
    a, b = S.scenes(5, 12), S.scenes(5, 12)
    assert a == b
    assert [S.render(s).tobytes() for s in a] == [S.render(s).tobytes() for s in b]
    assert S.scene_at(5, 7) == a[7]  # random access
    assert S.scenes(6, 12) != a
    caps = [S.caption(s, np.random.default_rng(3)) for s in a]
    assert caps == [S.caption(s, np.random.default_rng(3)) for s in a]


def test_scene_serialisation_round_trip(tmp_path):
    items = list(enumerate(S.scenes(2, 5), start=100))
    path = tmp_path / "scenes.jsonl"
    S.save_scenes(str(path), items)
    loaded = S.load_scenes(str(path))
    assert loaded == dict(items)
    assert S.render(loaded[103]).tobytes() == S.render(items[3][1]).tobytes()
    path.write_text(path.read_text() + '{"image_id": 7, "width": 3}\n')
    with pytest.raises(ValueError, match=r"scenes.jsonl:6"):
        S.load_scenes(str(path))


def test_caption_sentences_split_on_periods(many):
    rng = np.random.default_rng(0)
    vocab = set(S.vocabulary())
    for scene in many:
        for style in S.CAPTION_STYLES:
            sents = S.caption_sentences(scene, rng, style)
            text = S.caption(scene, np.random.default_rng(1), style)
            assert all(s.endswith(".") and s.count(".") == 1 and s[0].isupper() for s in sents)
            assert [p.strip() + "." for p in text.split(".")[:-1]] == S.caption_sentences(
                scene, np.random.default_rng(1), style)
            assert set(S.split_words(text)) <= vocab
    assert len(S.DETAIL_PROMPTS) >= 4
    for p in S.DETAIL_PROMPTS:
        assert set(S.split_words(p)) <= vocab


def test_object_sentences_name_colour_shape_and_cell(many):
    """Style "objects": one sentence per object, naming its colour, shape and one phrase of its cell."""
    rng = np.random.default_rng(4)
    all_phrases = sorted({p for ps in S.POSITION_PHRASES.values() for p in ps}, key=len, reverse=True)
    for scene in many:
        sents = [s.lower() for s in S.caption_sentences(scene, rng, "objects")]
        assert len(sents) == len(scene.objects)
        remaining = list(scene.objects)
        for s in sents:
            hit = [o for o in remaining if re.search(rf"\b{o.color} {o.shape}\b", s)
                   and next(p for p in all_phrases if p in s) in S.POSITION_PHRASES[o.cell]]
            assert hit, (s, remaining)
            remaining.remove(hit[0])


def test_caption_order_and_phrasing_vary():
    scene = next(s for s in S.scenes(1, 40) if len(s.objects) >= 4)
    rng = np.random.default_rng(0)
    caps = [S.caption(scene, rng) for _ in range(30)]
    assert len({c.split(".")[0] for c in caps}) >= 5
    assert len(set(caps)) == 30


def test_false_sentences_are_false():
    rng = np.random.default_rng(0)
    for scene in S.scenes(8, 60):
        present = {(o.color, o.shape) for o in scene.objects}
        for kind in ("color", "shape", "absent"):
            s = S.false_sentence(scene, rng, kind).lower()
            named = {(c, sh) for c in S.COLORS for sh in S.SHAPES if re.search(rf"\b{c} {sh}\b", s)}
            assert len(named) == 1 and not named & present, (kind, s)
            if kind == "absent":
                assert next(iter(named))[1] not in {o.shape for o in scene.objects}


def test_false_object_gives_minimal_pairs():
    """An object and its `false_object`, described with equally seeded generators, are worded the same and
    differ only in the altered attribute; the altered description is false for the scene."""
    from vimar_jax.eval.chair import parse_mentions

    changed = {"color": {"color"}, "shape": {"shape"}, "position": {"cell"}, "absent": {"shape", "color"}}
    for i, scene in enumerate(S.scenes(8, 40)):
        truth = {(o.color, o.shape, o.cell) for o in scene.objects}
        for j, obj in enumerate(scene.objects):
            for n, kind in enumerate(changed):
                wrong = S.false_object(scene, np.random.default_rng([i, j, n]), kind, obj=obj)
                t = S.object_sentence(obj, np.random.default_rng([i, j]))
                f = S.object_sentence(wrong, np.random.default_rng([i, j]))
                (mt,), (mf,) = parse_mentions(t), parse_mentions(f)
                assert (mt.color, mt.shape, mt.cell) in truth and (mf.color, mf.shape, mf.cell) not in truth, (t, f)
                diff = {a for a in ("color", "shape", "cell") if getattr(mt, a) != getattr(mf, a)}
                # "color"/"shape" fall back to "absent" when no colour/shape is free
                assert diff == changed[kind] or (diff <= changed["absent"] and mf.shape not in
                                                 {o.shape for o in scene.objects}), (kind, t, f)
                if kind != "position":   # same template and phrasing: the same number of words
                    assert len(t.split()) == len(f.split()), (t, f)
    with pytest.raises(ValueError, match="unknown negative kind"):
        S.false_object(scene, np.random.default_rng(0), "size")


def test_counterfactual_sentence_changes_one_attribute():
    """`counterfactual_sentence` of a true object sentence changes exactly the attribute of its kind (as read
    back by CHAIR's parser), keeps the rest of the wording and the article agreement, and keeps plurals."""
    from vimar_jax.eval.chair import parse_mentions

    attr = {"color": "color", "shape": "shape", "position": "cell"}
    seen = set()
    for i, scene in enumerate(S.scenes(9, 30)):
        for j, obj in enumerate(scene.objects):
            t = S.object_sentence(obj, np.random.default_rng([i, j]))
            for kinds in (("color",), ("shape",), ("position",), S.COUNTERFACTUAL_KINDS):
                f, kind = S.counterfactual_sentence(t, np.random.default_rng([i, j, len(kinds)]), kinds)
                seen.add(kind)
                assert kind in kinds
                (mt,), (mf,) = parse_mentions(t), parse_mentions(f)
                diff = {a for a in ("color", "shape", "cell") if getattr(mt, a) != getattr(mf, a)}
                assert diff == {attr[kind]}, (kind, t, f)
                assert f[0].isupper() and f.endswith(".")
                assert not re.search(r"\b[Aa] (?:orange)\b|\b[Aa]n (?:red|green|blue|yellow|purple|white)\b", f), f
                if kind != "position":
                    assert len(f.split()) == len(t.split())
    assert seen == set(S.COUNTERFACTUAL_KINDS)
    rng = np.random.default_rng(0)
    assert S.counterfactual_sentence("There are three objects.", rng) is None
    assert S.counterfactual_sentence("Two of them are crosses.", rng, ("shape",))[0] in {
        f"Two of them are {S.PLURALS[s]}." for s in S.SHAPES if s != "cross"}
    assert S.counterfactual_sentence("A red circle is here.", rng, ("color",))[0].split()[0] in ("A", "An")
    with pytest.raises(ValueError, match="unknown counterfactual kind"):
        S.counterfactual_sentence("A red circle.", rng, ("size",))


# --------------------------------------------------------------------------------------------- tokenizer

HAND = "There is a red circle in the top left. A small orange star, two crosses."


@pytest.mark.parametrize("variant,expected", [
    ("a", ["▁There", "▁is", "▁a", "▁red", "▁circle", "▁in", "▁the", "▁top", "▁left", ".", "▁A", "▁small",
           "▁orange", "▁star", ",", "▁two", "▁crosses", "."]),
    ("b", ["There", "Ġis", "Ġa", "Ġred", "Ġcircle", "Ġin", "Ġthe", "Ġtop", "Ġleft", ".", "ĠA", "Ġsmall",
           "Ġorange", "Ġstar", ",", "Ġtwo", "Ġcrosses", "."]),
])
def test_tokenizer_tokens_and_round_trip(variant, expected):
    tok = T.build_tokenizer(variant)
    enc = tok.encode(HAND, add_special_tokens=False)
    assert enc.tokens == expected
    assert tok.decode(enc.ids) == HAND
    unk = tok.token_to_id(T.special_tokens(variant)["unk"])
    rng = np.random.default_rng(0)
    for scene in S.scenes(4, 100):
        for style in S.CAPTION_STYLES:
            text = S.caption(scene, rng, style)
            ids = tok.encode(text, add_special_tokens=False).ids
            assert unk not in ids and tok.decode(ids) == text
    for text in S.DETAIL_PROMPTS + ("Two  objects.", "The circle is red. "):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert unk not in ids and tok.decode(ids) == text
    assert tok.encode("a zebra", add_special_tokens=False).ids[-1] == unk


def test_variants_differ():
    a, b = T.build_tokenizer("a"), T.build_tokenizer("b")
    va, vb = a.get_vocab(), b.get_vocab()
    assert va["<s>"] == 1 and va["</s>"] == 2 and va["<unk>"] == 0
    assert "<s>" not in vb and "[INST]" not in vb and "<|im_start|>" in vb and "<|im_end|>" in vb
    assert max(vb.values()) == vb["<image>"] == len(vb) - 1  # specials after the words
    assert {"Ġassistant", "Ġhelpful", "system"} <= set(vb) and "▁system" not in va
    shared = [w for w in S.vocabulary() if w.isalpha()]
    assert sum(va["▁" + w] == vb["Ġ" + w] for w in shared) < 5  # different id orders
    with pytest.raises(ValueError, match="variant"):
        T.build_tokenizer("c")


def _hf():
    transformers = pytest.importorskip("transformers")
    return transformers


def test_hf_loading_variant_a(tmp_path):
    transformers = _hf()
    T.save_tokenizer(str(tmp_path), "a")
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path))
        assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
        assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Describe this image in detail."}]}]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "[INST] <image>\nDescribe this image in detail. [/INST]"
        ids = hf(text).input_ids
        assert hf.convert_ids_to_tokens(ids) == ["<s>", "[INST]", "▁", "<image>", "\n", "Describe", "▁this",
                                                 "▁image", "▁in", "▁detail", ".", "▁", "[/INST]"]
        assert hf.decode(ids) == "<s>" + text
        full = messages + [{"role": "assistant", "content": HAND}]
        text2 = hf.apply_chat_template(full, tokenize=False)
        assert text2 == text + " " + HAND + "</s>"
        ids2 = hf(text2).input_ids
        assert hf.decode(ids2) == "<s>" + text2
        caption_ids = ids2[len(ids):-1]  # the caption tokens in context equal the caption alone
        assert caption_ids == hf(HAND, add_special_tokens=False).input_ids
        assert hf.decode(caption_ids) == HAND
        assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "[INST] Hi [/INST]"


def test_hf_loading_variant_b(tmp_path):
    transformers = _hf()
    T.save_tokenizer(str(tmp_path), "b")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.bos_token is None and hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                    "Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    ids = hf(text).input_ids
    assert hf.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "system", "Ċ"]
    assert hf.decode(ids) == text
    cap = hf(HAND, add_special_tokens=False).input_ids
    assert hf.decode(cap) == HAND
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == T.CHAT_TEMPLATE_B and config["add_bos_token"] is False
