"""CHAIR: exact figures on hand-written captions (tiny world and COCO), ground-truth captions score 0."""

import argparse
import json

import numpy as np
import pytest

from vimar_jax.data import scenes as S
from vimar_jax.eval import chair as C
from vimar_jax.eval import cli
from vimar_jax.eval import coco


def _obj(shape, color, row, col):
    return S.SceneObject(shape=shape, color=color, size="large", row=row, col=col, cx=20.0 + 40 * col,
                         cy=20.0 + 40 * row, radius=10.0, angle=0.0, rgb=S.COLORS[color])


# A: red circle top left, B: blue star center, C: green square bottom right, D: yellow square top right.
SCENE = S.Scene(width=120, height=120, background=(30, 30, 30), noise_seed=0, objects=(
    _obj("circle", "red", 0, 0), _obj("star", "blue", 1, 1), _obj("square", "green", 2, 2),
    _obj("square", "yellow", 0, 2)))

CAPTIONS = [
    # 3 mentions, all present; the star's stated cell is wrong (position hallucination only).
    # counted: "two squares" (right). words 9 + 7 + 4 = 20, 3 sentences.
    "There is a red circle in the top left. A blue star is at the bottom. There are two squares.",
    # green circle: shape ok, colour wrong; purple heart: absent; blue star: ok; triangles: absent, count
    # wrong (0 != 2). words 7 + 10 + 5 = 22, 3 sentences.
    "A green circle sits at the bottom. The image shows a purple heart and a blue star. Two of them are triangles.",
    # red star: shape ok, colour wrong; yellow square top right: ok; two definite references, both ok.
    # words 7 + 10 + 9 = 26, 3 sentences.
    "In the middle is a red star. A small yellow square is in the top right corner. "
    "The yellow square is left of the green square.",
    # "no hexagons" is not a mention; white stars: shape ok, colour wrong, count wrong (0 != 4).
    # words 4 + 6 = 10, 2 sentences.
    "There are no hexagons. Four of them are white stars.",
]


def test_parse_mentions():
    m = C.parse_mentions(CAPTIONS[1])
    assert [(x.shape, x.color, x.count, x.plural, x.definite, x.cell, x.sentence) for x in m] == [
        ("circle", "green", None, False, False, (2, 1), 0),
        ("heart", "purple", None, False, False, None, 1),
        ("star", "blue", None, False, False, None, 1),
        ("triangle", None, 2, True, False, None, 2),
    ]
    m = C.parse_mentions("The red circle is to the left of the blue star. At the top left, there is a small "
                         "white cross. Three orange diamonds.")
    assert [(x.shape, x.color, x.count, x.definite, x.cell) for x in m] == [
        ("circle", "red", None, True, None), ("star", "blue", None, True, None),
        ("cross", "white", None, False, (0, 0)), ("diamond", "orange", 3, False, None)]
    assert C.parse_mentions("There is no red circle.") == []


def test_hand_written_captions_per_caption():
    s = [C.score_caption(c, SCENE) for c in CAPTIONS]
    assert [len(x.mentions) for x in s] == [3, 4, 4, 1]
    assert [len(x.hallucinated) for x in s] == [0, 2, 0, 0]
    assert [len(x.attr_hallucinated) for x in s] == [0, 3, 1, 1]
    assert [len(x.pos_hallucinated) for x in s] == [1, 3, 1, 1]
    # Shape-level recall: c1 all four; c2 circle + star; c3 star (by cell), yellow square (by cell), green
    # square (the definite reference); c4 the star.
    assert [x.recalled for x in s] == [4, 2, 3, 1]
    # With colour: c1 red circle + blue star; c2 blue star; c3 yellow + green squares; c4 nothing.
    assert [x.attr_recalled for x in s] == [2, 1, 2, 0]
    assert [(x.n_counted, len(x.count_errors)) for x in s] == [(1, 0), (1, 1), (0, 0), (1, 1)]
    assert [x.sentences for x in s] == [3, 3, 3, 2]
    assert [x.words for x in s] == [20, 22, 26, 10]


def test_hand_written_captions_aggregate():
    r = C.tiny_chair([(c, SCENE) for c in CAPTIONS])
    expected = {
        "n_captions": 4, "n_mentions": 12, "n_objects": 16,
        "n_hallucinated": 2, "chair_i": 2 / 12, "chair_s": 1 / 4,
        "attr_n_hallucinated": 5, "attr_chair_i": 5 / 12, "attr_chair_s": 3 / 4,
        "pos_n_hallucinated": 6, "pos_chair_i": 6 / 12, "pos_chair_s": 4 / 4,
        "recall": 10 / 16, "attr_recall": 5 / 16,
        "n_counted": 3, "count_error_rate": 2 / 3,
        "sentences_per_caption": 11 / 4, "words_per_caption": 78 / 4,
    }
    assert r.keys() == expected.keys()
    for k, v in expected.items():
        assert r[k] == pytest.approx(v, abs=1e-12), k


def test_duplicate_objects_and_empty_caption():
    two_red = S.Scene(width=120, height=120, background=(30, 30, 30), noise_seed=0, objects=(
        _obj("circle", "red", 0, 0), _obj("circle", "red", 2, 2), _obj("star", "blue", 1, 1)))
    # Same red circle described twice at the same cell: one object, not two.
    s = C.score_caption("A red circle is in the top left. There is a red circle in the top left corner.", two_red)
    assert (s.recalled, s.attr_recalled) == (1, 1)
    s = C.score_caption("There are two red circles. The blue star is above the red circle.", two_red)
    assert (s.recalled, s.attr_recalled, len(s.count_errors), s.n_counted) == (3, 3, 0, 1)
    # "The red circle" is ambiguous here but not a hallucination.
    assert len(s.attr_hallucinated) == 0 and len(s.mentions) == 3
    r = C.tiny_chair([("", two_red)])
    assert (r["chair_i"], r["chair_s"], r["recall"], r["sentences_per_caption"]) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("style", S.CAPTION_STYLES)
def test_ground_truth_captions_score_zero(style):
    rng = np.random.default_rng(0)
    pairs = [(S.caption(s, rng, style), s) for s in S.scenes(21, 150)]
    r = C.tiny_chair(pairs)
    for k in ("chair_i", "chair_s", "attr_chair_i", "attr_chair_s", "pos_chair_i", "pos_chair_s",
              "count_error_rate"):
        assert r[k] == 0.0, k
    assert r["recall"] == 1.0 and r["attr_recall"] == 1.0
    assert r["n_mentions"] >= r["n_objects"] > 150


def test_false_sentences_are_hallucinations():
    rng = np.random.default_rng(1)
    for scene in S.scenes(22, 60):
        for kind, shape_level in (("color", False), ("shape", None), ("absent", True), ("position", False)):
            s = C.score_caption(S.false_sentence(scene, rng, kind), scene)
            assert len(s.mentions) == 1
            assert len(s.pos_hallucinated) == 1
            assert len(s.attr_hallucinated) == (kind != "position")
            if shape_level is not None:
                assert len(s.hallucinated) == shape_level


# -------------------------------------------------------------------------------------------------- COCO

def test_singular_and_find_objects():
    pairs = {"dogs": "dog", "benches": "bench", "puppies": "puppy", "ties": "tie", "buses": "bus", "bus": "bus",
             "glasses": "glass", "skis": "ski", "people": "person", "knives": "knife", "tennis": "tennis",
             "boxes": "box", "sandwiches": "sandwich", "scissors": "scissor", "horses": "horse", "grass": "grass"}
    assert {w: coco.singular(w) for w in pairs} == pairs
    assert coco.find_objects("Hot dogs and teddy bears near a motor bike at the tennis court, a bear.") == [
        ("hot dog", "hot dog"), ("teddy bear", "teddy bear"), ("motor bike", "motorcycle"), ("bear", "bear")]
    assert coco.find_objects("A baseball player swings a baseball bat at a baseball.") == [
        ("baseball player", "person"), ("baseball bat", "baseball bat"), ("baseball", "sports ball")]
    assert len(coco.COCO_CATEGORIES) == 80 and set(coco.COCO_CATEGORIES.values()) == set(coco.SYNONYMS)


INSTANCES = {
    "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
               {"id": 3, "file_name": "000000000003.jpg"}],
    "categories": [{"id": i, "name": coco.COCO_CATEGORIES[i]} for i in (1, 3, 18, 58, 67, 77, 88)],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 1},
        {"id": 12, "image_id": 1, "category_id": 18}, {"id": 13, "image_id": 1, "category_id": 67},
        {"id": 14, "image_id": 2, "category_id": 88}, {"id": 15, "image_id": 2, "category_id": 77},
    ],
}
CAPTION_LINES = [
    # image 1 {person, dog, dining table}: man, dining table, dog, woman ok; hot dog hallucinated. 10 + 5 words.
    {"image_id": 1, "caption": "Two men sit at a dining table with a dog. A woman eats hot dogs."},
    # image 2 {teddy bear, cell phone}: teddy bear, cellphone ok; cars hallucinated. 11 words.
    {"image": "val2017/000000000002.jpg", "caption": "A teddy bear sits next to a cellphone and two cars."},
    # image 3 {}: nothing mentioned. 3 words.
    {"image_id": 3, "caption": "An empty room."},
    # unknown image: skipped and counted.
    {"image_id": 99, "caption": "A cat."},
    None,  # a blank line
    # image 2: people, puppies, table, bear hallucinated; teddy ok. 8 + 5 words.
    {"image_id": 2, "caption": "Some people and their puppies near the table. The bear is a teddy."},
]
COCO_EXPECTED = {
    "setting": "coco", "n_captions": 4, "n_mentions": 5 + 3 + 0 + 5, "n_hallucinated": 1 + 1 + 0 + 4,
    "chair_i": 6 / 13, "chair_s": 3 / 4, "n_objects": 3 + 2 + 0 + 2, "recall": (3 + 2 + 0 + 1) / 7,
    "sentences_per_caption": 6 / 4, "words_per_caption": 42 / 4, "n_unknown_images": 1,
    "unknown_images": [[4, 99]],
}


@pytest.fixture
def coco_files(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(INSTANCES))
    caps = tmp_path / "captions.jsonl"
    caps.write_text("\n".join("" if r is None else json.dumps(r) for r in CAPTION_LINES) + "\n")
    return ann, caps


def _run(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_coco_chair_file(coco_files):
    ann, caps = coco_files
    gt = C.load_instances(str(ann))
    assert gt == {1: {"person", "dog", "dining table"}, 2: {"teddy bear", "cell phone"}, 3: set()}
    r = C.evaluate_file(str(caps), annotations=str(ann))
    r["unknown_images"] = [list(x) for x in r["unknown_images"]]
    assert r.keys() == COCO_EXPECTED.keys()
    for k, v in COCO_EXPECTED.items():
        assert r[k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v), k


def test_cli_table_and_json(coco_files, tmp_path, capsys):
    ann, caps = coco_files
    out = tmp_path / "chair.json"
    assert _run(["chair", str(caps), "--annotations", str(ann), "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "CHAIR_S (%)" in printed.out and "75.00" in printed.out and "46.15" in printed.out
    assert "skipped 1 caption" in printed.err and "line 4: id 99" in printed.err
    saved = json.loads(out.read_text())
    assert saved["chair_i"] == pytest.approx(6 / 13) and saved["recall"] == pytest.approx(6 / 7)


def test_cli_tiny_world(tmp_path, capsys):
    S.save_scenes(str(tmp_path / "scenes.jsonl"), [(5, SCENE)])
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image": f"tiny/{5:06d}.png", "caption": c}) + "\n" for c in CAPTIONS))
    out = tmp_path / "r.json"
    assert _run(["chair", str(caps), "--scenes", str(tmp_path / "scenes.jsonl"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["setting"] == "tiny" and r["chair_i"] == pytest.approx(2 / 12) and r["attr_chair_s"] == 0.75
    assert "attribute CHAIR_I (%)" in capsys.readouterr().out


def test_bad_input(coco_files, tmp_path, capsys):
    ann, caps = coco_files
    assert _run(["chair", str(tmp_path / "missing.jsonl"), "--annotations", str(ann)]) == 2
    assert "captions file not found" in capsys.readouterr().err
    assert _run(["chair", str(caps), "--annotations", str(tmp_path / "nope.json")]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1, "caption": "a dog"}\n\n{"image_id": 2, "caption": \n')
    assert _run(["chair", str(bad), "--annotations", str(ann)]) == 2
    assert "bad.jsonl:3: invalid JSON" in capsys.readouterr().err
    bad.write_text('{"image_id": 1, "text": "a dog"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing string field 'caption'"):
        C.load_captions(str(bad))
    bad.write_text('{"image": "pics/cat.jpg", "caption": "a dog"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no image id in file name"):
        C.load_captions(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**INSTANCES, "categories": [{"id": 1, "name": "unicorn"}]}))
    with pytest.raises(ValueError, match="'unicorn' .* not one of the COCO-80"):
        C.load_instances(str(wrong))
    wrong.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="missing key 'annotations'"):
        C.load_instances(str(wrong))
    with pytest.raises(ValueError, match="exactly one"):
        C.evaluate_file(str(caps))
