"""`vimar caption` (vimar_jax.caption_cli) on tiny random models: JSON lines, an unreadable image, the HTML
report, and clear errors for missing models / θ."""

import argparse
import html
import json

import pytest

from tests.test_generate import images
from tests.test_searches import make_value_dir, tiny_model_dirs
from vimar_jax import caption_cli, pipeline

FAST = ["--temperatures", "0.7,1.0", "-k", "1", "--max-new-tokens", "16", "--sentence-max-tokens", "16",
        "--max-sentences", "3"]


def run_cli(argv):
    p = argparse.ArgumentParser()
    caption_cli.add_arguments(p)
    return caption_cli.run(p.parse_args(argv))


def test_json_lines_bad_image_and_html(tmp_path, capsys):
    d = tiny_model_dirs()
    paths = []
    for i, im in enumerate(images([(30, 50), (60, 20), (40, 40)], seed=7)):
        paths.append(str(tmp_path / f"img{i}.png"))
        im.save(paths[-1])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    paths.insert(1, str(bad))
    report = tmp_path / "report.html"
    rc = run_cli([*paths, "--method", "vimar", "--policy", d["policy"], "--value", d["value"], "--json",
                  "--html", str(report), *FAST])
    out, err = capsys.readouterr()
    assert rc == 1                                               # one image could not be read
    assert "broken.jpg" in err and "cannot read image" in err
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["image"] for r in rows] == [p for p in paths if p != str(bad)]
    for r in rows:
        assert set(r) == {"image", "method", "caption", "sentences", "seconds"}
        assert r["method"] == "vimar" and r["seconds"] > 0
        assert r["caption"] == " ".join(s["text"] for s in r["sentences"])
        for s in r["sentences"]:
            assert set(s) == {"text", "value", "refined"} and isinstance(s["value"], float)
    assert sum(bool(r["caption"]) for r in rows) >= 2
    page = report.read_text()
    for r in rows:
        assert html.escape(r["image"]) in page
        for s in r["sentences"]:
            assert html.escape(s["text"]) in page
    assert html.escape(str(bad)) in page and "cannot read image" in page


def test_plain_output_and_greedy_without_value(tmp_path, capsys):
    d = tiny_model_dirs()
    path = str(tmp_path / "a.png")
    images([(28, 28)], seed=3)[0].save(path)
    # No value or CLIP directory is needed (nor loaded) for greedy.
    rc = run_cli([path, "--method", "greedy", "--policy", d["policy"], "--value", str(tmp_path / "nope"), *FAST])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith(f"{path}: ")


def test_missing_models_and_theta_are_clear_errors(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "a.png")
    images([(28, 28)])[0].save(path)
    monkeypatch.setattr(pipeline, "TINY_WORLD", tmp_path / "assets" / "tiny_world")
    assert run_cli([path, "--method", "greedy"]) == 2
    err = capsys.readouterr().err
    assert "tiny-world policy" in err and str(tmp_path / "assets" / "tiny_world" / "policy") in err

    value = tmp_path / "value"
    make_value_dir(value)
    cfg = json.loads((value / "config.json").read_text())
    del cfg["vimar_value"]["stats"]
    (value / "config.json").write_text(json.dumps(cfg))
    d = tiny_model_dirs()
    assert run_cli([path, "--method", "vimar", "--policy", d["policy"], "--value", str(value)]) == 2
    assert "--theta" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="clip model directory"):
        pipeline.build_engine(policy=d["policy"], value=False, clip=str(tmp_path / "no_clip"))
