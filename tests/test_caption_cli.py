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


SEARCH_FLAGS = ["--temperatures", "0.2, 0.6", "-k", "3", "--top-p", "0.8", "--theta", "0.1", "--stage2", "append_only",
                "--caption-score", "min", "--bon-scorer", "value", "--max-new-tokens", "40", "--sentence-max-tokens",
                "12", "--max-sentences", "5", "--max-refine", "3", "--max-append", "0", "--drop-below", "-1.5",
                "--compact-decode"]


def test_caption_eval_and_demo_share_the_search_flags():
    """The three verbs parse the same search flags into the same `SearchConfig` (the sampling seed is `--seed`
    for `vimar caption`, `--search-seed` where `--seed` names the scene stream); unset flags keep the defaults."""
    from vimar_jax.cli import build_parser
    from vimar_jax.decode.search import SearchConfig

    want = SearchConfig(temperatures=(0.2, 0.6), samples_per_temperature=3, top_p=0.8, theta=0.1,
                        stage2="append_only", caption_score="min", bon_scorer="value", max_new_tokens=40,
                        sentence_max_tokens=12, max_sentences=5, max_refine=3, max_append=0, drop_below=-1.5, seed=7,
                        compact_decode=True)
    parser = build_parser()
    for argv in (["caption", "a.png", "--seed", "7"], ["eval", "--n", "2", "--seed", "1003", "--search-seed", "7"],
                 ["demo", "--seed", "1003", "--search-seed", "7"]):
        args = parser.parse_args([*argv, *SEARCH_FLAGS])
        assert caption_cli.search_config(args) == want, argv
        assert caption_cli.search_config(parser.parse_args(argv)) == SearchConfig(seed=7)
        if argv[0] != "caption":
            assert args.seed == 1003
    with pytest.raises(ValueError, match="--temperatures"):
        caption_cli.search_config(parser.parse_args(["caption", "a.png", "--temperatures", "0.1,hot"]))
    assert caption_cli.search_config(parser.parse_args(["eval", "--theta-percentile", "70"])) == \
        SearchConfig(theta_percentile=70.0)
    with pytest.raises(ValueError, match="not both"):
        caption_cli.search_config(parser.parse_args(["eval", "--theta-percentile", "70", "--theta", "0.2"]))
    with pytest.raises(ValueError, match="max_append=-1"):
        caption_cli.search_config(parser.parse_args(["eval", "--max-append", "-1"]))


def test_demo_runs_on_given_model_dirs(tmp_path, capsys):
    """`vimar demo` with --policy/--value/--clip and the shared search flags: every method's captions, values
    and table (the shipped-model test in tests/test_tiny_world.py skips until those models are built)."""
    from vimar_jax.cli import main

    d = tiny_model_dirs()
    html_path = tmp_path / "demo.html"
    rc = main(["demo", "--n", "1", "--methods", "greedy,vimar", "--html", str(html_path), "--quiet",
               "--policy", d["policy"], "--value", d["value"], "--clip", d["clip"], "--search-seed", "3", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    table = out[out.index("\nmethod ") + 1:].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["greedy", "vimar"]
    assert html_path.read_text().count("<div class='item'>") == 2


def test_help_does_not_import_jax():
    """`vimar --help` and every verb's parser build without importing jax or flax (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from vimar_jax.cli import build_parser; p = build_parser(); "
            "p.parse_args(['eval', 'tiny', '--n', '2']); "
            "bad = sorted(m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
