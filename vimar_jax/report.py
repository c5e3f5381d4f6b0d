"""A self-contained HTML report of captions: each image, its caption, sentence values as colour, and
which sentences ViMaR's Stage 2 replaced or appended."""

from __future__ import annotations

import base64
import html
import io
from typing import Iterable, Mapping

import numpy as np

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.item { display: flex; gap: 1.5em; margin-bottom: 2em; align-items: flex-start; }
.item img { max-width: 260px; max-height: 260px; border: 1px solid #ccc; image-rendering: pixelated; }
.caption { max-width: 60em; line-height: 1.7; }
.s { padding: 0.1em 0.2em; border-radius: 3px; }
.replaced { outline: 2px solid #1f5fbf; }
.appended { outline: 2px dashed #1f5fbf; }
.meta { color: #666; font-size: 0.85em; margin-top: 0.4em; }
.error { color: #b00; }
table { border-collapse: collapse; margin-bottom: 2em; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
.legend span { margin-right: 1em; }
"""


def _thumb(image, max_side: int = 256) -> str:
    from PIL import Image

    if image is None:
        return ""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def value_colour(value: float | None, lo: float, hi: float) -> str:
    """Red (low) through yellow to green (high), as an rgba background."""
    if value is None or not np.isfinite(value):
        return "transparent"
    t = 0.5 if hi <= lo else float(np.clip((value - lo) / (hi - lo), 0.0, 1.0))
    r = int(round(230 * min(1.0, 2 * (1 - t))))
    g = int(round(190 * min(1.0, 2 * t)))
    return f"rgba({r},{g},60,0.35)"


def render(results: Iterable[Mapping], *, title: str = "vimar-jax captions", theta: float | None = None,
           summary: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """results: dicts with `image` (path or PIL image or None), `image_name`, `method`, `caption`,
    `sentences` ([{text, value, refined, origin}]), `seconds`, optionally `error`."""
    results = list(results)
    values = [s.get("value") for r in results for s in r.get("sentences", []) if s.get("value") is not None]
    lo, hi = (float(np.min(values)), float(np.max(values))) if values else (0.0, 1.0)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    out.append("<p class='legend'><span>sentence colour: value, red = low, green = high"
               + (f" (θ = {theta:.3g})" if theta is not None else "") + "</span>"
               "<span class='s replaced'>replaced by Stage 2</span><span class='s appended'>appended by Stage 2"
               "</span></p>")
    if summary:
        cols = sorted({k for row in summary.values() for k in row})
        out.append("<table><tr><th>method</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        for method, row in summary.items():
            cells = "".join(f"<td>{row[c]:.4g}</td>" if isinstance(row.get(c), (int, float)) else "<td></td>"
                            for c in cols)
            out.append(f"<tr><th>{html.escape(method)}</th>{cells}</tr>")
        out.append("</table>")
    for r in results:
        name = html.escape(str(r.get("image_name") or r.get("image") or ""))
        out.append("<div class='item'>")
        try:
            src = _thumb(r.get("image_pil") or r.get("image"))
        except Exception:  # an unreadable image was already reported; show the caption anyway
            src = ""
        if src:
            out.append(f"<img src='{src}' alt='{name}'>")
        out.append(f"<div class='caption'><b>{name}</b> · {html.escape(str(r.get('method', '')))}<br>")
        if r.get("error"):
            out.append(f"<span class='error'>{html.escape(str(r['error']))}</span>")
        for s in r.get("sentences", []):
            cls = "s" + (f" {s['origin']}" if s.get("origin") in ("replaced", "appended") else "")
            v = s.get("value")
            tip = f"value {v:.4f}" if v is not None else ""
            out.append(f"<span class='{cls}' style='background:{value_colour(v, lo, hi)}' title='{tip}'>"
                       f"{html.escape(s['text'])}</span> ")
        if "seconds" in r:
            out.append(f"<div class='meta'>{r['seconds']:.2f} s</div>")
        out.append("</div></div>")
    out.append("</body></html>")
    return "".join(out)
