"""Host-side image preprocessing for LLaVA-NeXT ("anyres") and CLIP, numpy/PIL only.

Equal to Hugging Face transformers' PIL image processors (`LlavaNextImageProcessorPil`, `CLIPImageProcessorPil`,
which `LlavaNextImageProcessor`/`CLIPImageProcessor` fall back to without torchvision):

* anyres: pick the pinpoint resolution that keeps the most of the image (`select_best_resolution`), resize the
  image into it keeping the aspect ratio (PIL, `resample` from the config, bicubic by default), centre it on a
  black canvas of that resolution, cut the canvas into `crop_size` tiles in row-major order, and put a
  base view (the whole image resized to the processor `size`, aspect ratio NOT kept) first;
* every view then goes through the plain CLIP pipeline: resize (shortest edge), centre crop, rescale
  (uint8 * rescale_factor in float64, then float32) and normalise ((x - mean) / std in float32).

Token bookkeeping shared by the tokenizer side and the model side lives here too: `num_image_tokens` (the
number of `<image>` placeholders an image expands to) and `feature_gather_index` (where each of those
placeholders takes its vision feature from), both built on one helper, `_unpadded_grid`.

The torchvision backend of HF (used when torchvision is installed) resizes with torch's antialiased bicubic
kernel, which differs from PIL's by a few 1e-3 in normalised pixel values; we follow the PIL backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
STRATEGIES = ("default", "full")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Everything the host pipeline and the feature gather need.

    Vision tower: `image_size` (S, the square input of one view), `patch_size`, `has_cls` (the tower emits a
    CLS token before its S/p * S/p patch tokens: CLIP yes, SigLIP no), `strategy` ("default" drops the CLS
    token, "full" keeps every token). Anyres: `pinpoints` ((h, w) resolutions, multiples of S; empty for a
    plain CLIP model). Pixels: the HF image processor fields.
    """

    image_size: int = 336
    patch_size: int = 14
    pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS
    strategy: str = "default"
    has_cls: bool = True
    # HF image processor fields (defaults: LlavaNextImageProcessor / CLIPImageProcessor class defaults).
    size: tuple[tuple[str, int], ...] = (("shortest_edge", 224),)
    crop_size: tuple[int, int] = (224, 224)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    do_convert_rgb: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for hw in self.pinpoints:
            if len(hw) != 2 or hw[0] % self.image_size or hw[1] % self.image_size or min(hw) <= 0:
                raise ValueError(f"image_grid_pinpoints entry {list(hw)} is not a positive multiple of the vision "
                                 f"image_size {self.image_size}")
        size = dict(self.size)
        if not ("shortest_edge" in size or ("height" in size and "width" in size)):
            raise ValueError(f"image processor `size` needs 'shortest_edge' or 'height'+'width', got {size}")

    # ---- derived quantities ----
    @property
    def grid(self) -> int:
        """Patch tokens per side of one view (S / patch_size)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        """Tokens the vision tower emits per view (CLS included when it has one): the P of the gather."""
        return self.grid * self.grid + int(self.has_cls)

    @property
    def size_dict(self) -> dict[str, int]:
        return dict(self.size)

    @property
    def base_size(self) -> tuple[int, int]:
        """(h, w) the whole image is resized to for the anyres base view."""
        s = self.size_dict
        if "height" in s and "width" in s:
            return s["height"], s["width"]
        return s["shortest_edge"], s["shortest_edge"]

    def num_image_tokens(self, orig_hw: Sequence[int]) -> int:
        return num_image_tokens(orig_hw, image_size=self.image_size, patch_size=self.patch_size,
                                pinpoints=self.pinpoints, strategy=self.strategy, has_cls=self.has_cls)

    def num_patches(self, orig_hw: Sequence[int]) -> int:
        """Views of an image: the base view plus its anyres tiles."""
        rows, cols = anyres_grid(orig_hw, self.pinpoints, self.image_size)
        return 1 + rows * cols

    @property
    def max_num_patches(self) -> int:
        """The most views any image can have (a static bound for padding `pixel_values`)."""
        return 1 + max((h // self.image_size) * (w // self.image_size) for h, w in self.pinpoints)

    @property
    def max_image_tokens(self) -> int:
        """The most `<image>` tokens any image can expand to (a static bound for the gather index)."""
        g = self.grid
        base = g * g + int(self.has_cls and self.strategy == "full")
        return base + max((h // self.image_size * g) * (w // self.image_size * g + 1) for h, w in self.pinpoints)

    # ---- construction from Hugging Face files ----
    @classmethod
    def from_hf(cls, model_config: Mapping[str, Any] | None, image_processor: Mapping[str, Any],
                processor: Mapping[str, Any] | None = None) -> "ImageConfig":
        """From HF `config.json` (LLaVA-NeXT or CLIP; may be None), `preprocessor_config.json` and optionally
        `processor_config.json` (its `patch_size`, `vision_feature_select_strategy` and
        `num_additional_image_tokens` are used when there is no model config, and checked against it otherwise)."""
        mc = dict(model_config or {})
        ip = dict(image_processor)
        pc = dict(processor or {})
        kw: dict[str, Any] = {}
        model_type = mc.get("model_type")
        if model_config is not None:
            if model_type == "clip":
                vc = dict(mc.get("vision_config") or {})
                vc.setdefault("model_type", "clip_vision_model")
            elif "vision_config" in mc and mc["vision_config"] is not None:
                vc = dict(mc["vision_config"])
                vc.setdefault("model_type", "clip_vision_model")
            elif model_type in ("clip_vision_model", "siglip_vision_model"):
                vc = mc
            else:  # LlavaNextConfig() without a vision_config: CLIP ViT-L/14-336
                vc = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
            vtype = vc.get("model_type", "clip_vision_model")
            if vtype not in ("clip_vision_model", "siglip_vision_model"):
                raise ValueError(f"vision_config.model_type {vtype!r} is not supported (clip_vision_model, "
                                 "siglip_vision_model)")
            # HF CLIPVisionConfig defaults when a vision_config dict omits them.
            default_s, default_p = (224, 32) if vtype == "clip_vision_model" else (224, 16)
            kw["image_size"] = int(vc.get("image_size", default_s))
            kw["patch_size"] = int(vc.get("patch_size", default_p))
            kw["has_cls"] = vtype == "clip_vision_model"
            if model_type == "clip" or model_type in ("clip_vision_model", "siglip_vision_model"):
                kw["pinpoints"] = ()
                kw["strategy"] = "full"
            else:
                kw["strategy"] = mc.get("vision_feature_select_strategy", "default")
                pins = mc.get("image_grid_pinpoints") or ip.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
                kw["pinpoints"] = tuple((int(h), int(w)) for h, w in pins)
            for key, ours in (("patch_size", "patch_size"), ("vision_feature_select_strategy", "strategy")):
                if key in pc and pc[key] is not None and pc[key] != kw[ours]:
                    raise ValueError(f"processor_config.json {key}={pc[key]!r} disagrees with config.json "
                                     f"({kw[ours]!r}): the HF processor would insert a wrong number of <image> tokens")
            n_extra = pc.get("num_additional_image_tokens")
            if n_extra is not None and int(n_extra) != int(kw["has_cls"]):
                raise ValueError(f"processor_config.json num_additional_image_tokens={n_extra} but the vision tower "
                                 f"({vtype}) has {int(kw['has_cls'])} extra token(s): HF would insert a number of "
                                 "<image> tokens the model cannot fill")
        else:  # processor files only
            crop = ip.get("crop_size") or {}
            kw["image_size"] = int(crop.get("height", 336)) if isinstance(crop, Mapping) else int(crop)
            if "patch_size" not in pc:
                raise ValueError("without config.json, processor_config.json must give `patch_size`")
            kw["patch_size"] = int(pc["patch_size"])
            kw["strategy"] = pc.get("vision_feature_select_strategy") or "default"
            kw["has_cls"] = bool(pc.get("num_additional_image_tokens", 1))
            pins = ip.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
            kw["pinpoints"] = tuple((int(h), int(w)) for h, w in pins)

        size = ip.get("size", {"shortest_edge": 224})
        if isinstance(size, (int, float)):
            size = {"shortest_edge": int(size)}
        kw["size"] = tuple(sorted((str(k), int(v)) for k, v in size.items() if v is not None))
        crop = ip.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, (int, float)):
            crop = {"height": int(crop), "width": int(crop)}
        kw["crop_size"] = (int(crop["height"]), int(crop["width"]))
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in ip and ip[key] is not None:
                kw[key] = bool(ip[key])
        if ip.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(ip["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if ip.get(key) is not None:
                v = ip[key]
                v = [v] * 3 if isinstance(v, (int, float)) else v
                if len(v) != 3:
                    raise ValueError(f"preprocessor_config.json {key} must have 3 values, got {v}")
                kw[key] = tuple(float(x) for x in v)
        if ip.get("resample") is not None:
            kw["resample"] = int(ip["resample"])
        cfg = cls(**kw)
        if cfg.pinpoints and cfg.crop_size != (cfg.image_size, cfg.image_size):
            raise ValueError(f"preprocessor_config.json crop_size {list(cfg.crop_size)} must equal the vision "
                             f"image_size {cfg.image_size} for anyres tiling")
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ImageConfig":
        """From an HF checkpoint (or `vimar convert` output) directory. The image processor fields come from
        `processor_config.json["image_processor"]` (transformers 5 layout) or else `preprocessor_config.json`."""
        path = os.fspath(path)
        model_config = _read_json(os.path.join(path, "config.json"))
        processor = _read_json(os.path.join(path, "processor_config.json"))
        image_processor = (processor or {}).get("image_processor")
        if not isinstance(image_processor, dict):
            image_processor = _read_json(os.path.join(path, "preprocessor_config.json"))
        if image_processor is None:
            raise FileNotFoundError(f"no preprocessor_config.json (nor an 'image_processor' entry in "
                                    f"processor_config.json) in {path}")
        return cls.from_hf(model_config, image_processor, processor)


def _read_json(file: str) -> dict | None:
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e


# --------------------------------------------------------------------------------------------------------
# Anyres geometry and token counts
# --------------------------------------------------------------------------------------------------------


def select_best_resolution(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (h, w) pinpoint that keeps the most original pixels (ties: the least padding; then the first)."""
    orig_h, orig_w = int(size_hw[0]), int(size_hw[1])
    if orig_h <= 0 or orig_w <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = {(orig_h, orig_w)}")
    if not pinpoints:
        raise ValueError("no image_grid_pinpoints to choose a resolution from")
    best, best_kept, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / orig_w, h / orig_h)
        kept = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(h), int(w)), kept, waste
    return best


def anyres_grid(orig_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], image_size: int) -> tuple[int, int]:
    """(rows, cols) of anyres tiles for an image of size `orig_hw`."""
    h, w = select_best_resolution(orig_hw, pinpoints)
    return h // image_size, w // image_size


def resized_size(orig_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the image resized into `target_hw` keeping its aspect ratio (HF rounds the short side up)."""
    orig_h, orig_w = orig_hw
    th, tw = target_hw
    scale_w, scale_h = tw / orig_w, th / orig_h
    if scale_w < scale_h:
        return min(math.ceil(orig_h * scale_w), th), tw
    return th, min(math.ceil(orig_w * scale_h), tw)


def _unpadded_grid(orig_hw: Sequence[int], rows: int, cols: int, grid: int) -> tuple[int, int, int, int]:
    """HF's unpadding of the (rows*grid) x (cols*grid) feature map: (top, height, left, width) kept."""
    orig_h, orig_w = int(orig_hw[0]), int(orig_hw[1])
    cur_h, cur_w = rows * grid, cols * grid
    top = left = 0
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        top = (cur_h - new_h) // 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        left = (cur_w - new_w) // 2
    return top, max(cur_h - 2 * top, 0), left, max(cur_w - 2 * left, 0)


def num_image_tokens(orig_hw: Sequence[int], *, image_size: int, patch_size: int,
                     pinpoints: Sequence[Sequence[int]], strategy: str, has_cls: bool = True) -> int:
    """`<image>` tokens an image of (h, w) expands to: the base view's tokens, then the unpadded tile grid with
    one newline per row. Equals HF `LlavaNextProcessor` (with num_additional_image_tokens = has_cls) and the
    length of HF's packed image features."""
    if strategy not in STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, got {strategy!r}")
    grid = image_size // patch_size
    rows, cols = anyres_grid(orig_hw, pinpoints, image_size)
    _, kept_h, _, kept_w = _unpadded_grid(orig_hw, rows, cols, grid)
    base = grid * grid + int(has_cls and strategy == "full")
    return base + kept_h * kept_w + kept_h


def feature_gather_index(image_sizes, num_patches_padded: int, cfg: ImageConfig, *,
                         max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where each image token takes its feature from, as indices into
    `flat = concat(features.reshape(B * num_patches_padded * P, E), newline[None])`.

    `features` [B, num_patches_padded, P, E] are the vision tower's (projected) tokens of every view, with
    P = `cfg.tokens_per_view` (CLS INCLUDED when the tower has one: the index skips it under the "default"
    strategy, so do not drop it before gathering). `flat[index[b, :n_tokens[b]]]` is HF's packed sequence of
    image b: the base view's tokens, then the tile grid row by row (HF's unpadding crop), a newline after each
    row. Slots past n_tokens[b] point at the newline row. Returns (index [B, max_tokens] int32,
    n_tokens [B] int32); max_tokens defaults to `cfg.max_image_tokens`, so shapes are static.
    """
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    if cfg.strategy == "default" and not cfg.has_cls:
        raise ValueError("vision_feature_select_strategy 'default' drops a CLS token, but the vision tower has none")
    if cfg.strategy == "full" and cfg.has_cls:
        raise ValueError("vision_feature_select_strategy 'full' with a CLS vision tower cannot be packed into the "
                         "anyres grid (HF LLaVA-NeXT fails on it too)")
    g, P, S = cfg.grid, cfg.tokens_per_view, cfg.image_size
    off = int(cfg.has_cls)  # first patch token of a view (after the CLS token, dropped by "default")
    width = cfg.max_image_tokens if max_tokens is None else int(max_tokens)
    B = sizes.shape[0]
    newline_row = B * num_patches_padded * P
    index = np.full((B, width), newline_row, dtype=np.int64)
    n_tokens = np.zeros((B,), np.int32)
    patch_tok = off + np.arange(g * g)
    for b, hw in enumerate(sizes):
        rows, cols = anyres_grid(hw, cfg.pinpoints, S)
        if 1 + rows * cols > num_patches_padded:
            raise ValueError(f"image {b} of size {tuple(int(x) for x in hw)} has {1 + rows * cols} views but "
                             f"pixel_values only holds {num_patches_padded}")
        top, kh, left, kw = _unpadded_grid(hw, rows, cols, g)
        view0 = b * num_patches_padded * P
        base = view0 + patch_tok
        ys = np.arange(top, top + kh)[:, None]
        xs = np.arange(left, left + kw)[None, :]
        tile = 1 + (ys // g) * cols + xs // g
        grid_idx = view0 + tile * P + off + (ys % g) * g + xs % g  # [kh, kw]
        grid_idx = np.concatenate([grid_idx, np.full((kh, 1), newline_row)], axis=1).reshape(-1)
        seq = np.concatenate([base, grid_idx])
        if seq.size > width:
            raise ValueError(f"image {b} needs {seq.size} tokens but max_tokens is {width}")
        expected = num_image_tokens(hw, image_size=S, patch_size=cfg.patch_size, pinpoints=cfg.pinpoints,
                                    strategy=cfg.strategy, has_cls=cfg.has_cls)
        assert seq.size == expected, (seq.size, expected)
        index[b, :seq.size] = seq
        n_tokens[b] = seq.size
    if newline_row >= 2**31:
        raise ValueError("feature array too large for int32 gather indices")
    return index.astype(np.int32), n_tokens


# --------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------


def to_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (transparency composited on white, like HF) or a uint8 HWC /
    HW array (1, 3 or 4 channels)."""
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W, C], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:  # HF's numpy path: blend onto white, round
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def _resize(arr: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resize of a uint8 HWC array to (h, w); the same size is a copy (as in PIL)."""
    if arr.shape[:2] == tuple(hw):
        return arr
    return np.asarray(Image.fromarray(arr).resize((int(hw[1]), int(hw[0])), resample=resample))


def _shortest_edge_size(hw: tuple[int, int], edge: int) -> tuple[int, int]:
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def _center_crop(arr: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """HF centre crop of an HWC array (zero-padding first when the image is smaller than the crop)."""
    h, w = arr.shape[:2]
    ch, cw = crop_hw
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + arr.shape[2:], arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _finish_view(arr: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """resize -> centre crop -> rescale -> normalise one uint8 HWC view; float32 [3, h, w]."""
    if cfg.do_resize:
        s = cfg.size_dict
        if "shortest_edge" in s:
            target = _shortest_edge_size(arr.shape[:2], s["shortest_edge"])
        else:
            target = (s["height"], s["width"])
        arr = _resize(arr, target, cfg.resample)
    if cfg.do_center_crop:
        arr = _center_crop(arr, cfg.crop_size)
    x = np.moveaxis(arr, -1, 0)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def anyres_views(image, cfg: ImageConfig) -> list[np.ndarray]:
    """The uint8 HWC views of an image before the per-view pipeline: base view, then tiles row-major."""
    arr = to_rgb(image) if cfg.do_convert_rgb or not isinstance(image, np.ndarray) else np.asarray(image)
    h, w = arr.shape[:2]
    best_h, best_w = select_best_resolution((h, w), cfg.pinpoints)
    new_h, new_w = resized_size((h, w), (best_h, best_w))
    canvas = np.zeros((best_h, best_w, arr.shape[2]), np.uint8)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = _resize(arr, (new_h, new_w), cfg.resample)
    tile = cfg.crop_size[0]  # HF tiles squares of crop_size["height"]
    tiles = [canvas[i:i + tile, j:j + tile] for i in range(0, best_h, tile) for j in range(0, best_w, tile)]
    return [_resize(arr, cfg.base_size, cfg.resample)] + tiles


def preprocess_anyres(image, cfg: ImageConfig) -> np.ndarray:
    """float32 [n_views, 3, S, S] for one image (PIL or uint8 HWC array): base view first, then tiles."""
    if not cfg.pinpoints:
        raise ValueError("preprocess_anyres needs image_grid_pinpoints (this config has none)")
    return np.stack([_finish_view(v, cfg) for v in anyres_views(image, cfg)])


def image_size_hw(image) -> tuple[int, int]:
    """(h, w) of a PIL image or an HWC array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    arr = np.asarray(image)
    return int(arr.shape[0]), int(arr.shape[1])


def clip_preprocess(image, cfg: ImageConfig) -> np.ndarray:
    """float32 [3, S, S], equal to HF `CLIPImageProcessor` (PIL backend) with the same config."""
    arr = to_rgb(image) if cfg.do_convert_rgb or not isinstance(image, np.ndarray) else np.asarray(image)
    return _finish_view(arr, cfg)


def batch_pixel_values(images: Sequence, cfg: ImageConfig, *, pad_to: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values [N, max_views, 3, S, S] float32 (zero views pad images with fewer tiles, as HF) and
    image_sizes [N, 2] int32 for a list of images. `pad_to` pads the view axis further (static shapes)."""
    views = [preprocess_anyres(im, cfg) for im in images]
    sizes = np.array([image_size_hw(im) for im in images], np.int32).reshape(-1, 2)
    if not views:
        raise ValueError("batch_pixel_values needs at least one image")
    n = max(v.shape[0] for v in views)
    if pad_to is not None:
        if pad_to < n:
            raise ValueError(f"pad_to={pad_to} is smaller than the {n} views of the largest image")
        n = pad_to
    out = np.zeros((len(views), n) + views[0].shape[1:], np.float32)
    for i, v in enumerate(views):
        out[i, :v.shape[0]] = v
    return out, sizes
