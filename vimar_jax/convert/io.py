"""Checkpoint I/O: stream safetensors tensors through `TensorRule`s, one tensor at a time.

Two kinds of directory hold a model:

* a Hugging Face directory: `config.json` + `model.safetensors` (or shards listed in
  `model.safetensors.index.json`), keys and layouts as HF writes them;
* a `vimar convert` output: `config.json` (the HF config), `vimar.json` (what the HF checkpoint looked
  like) and our parameters as safetensors keyed by dotted paths (``"decoder.layers.q_proj"``).

`load_module` builds a concrete NNX module from either. `convert_to_vimar` / `convert_to_hf` translate
between them; `convert_to_hf(convert_to_vimar(d))` reproduces the HF files byte for byte (dtype "keep").

Files are memory-mapped; each tensor's pages are released (`madvise(MADV_DONTNEED)`) once it has been
copied out, and parameters are built and placed one at a time, so the host never holds the model twice.
Safetensors files are parsed and written by this module (the format is a little-endian u64 header length,
a JSON header of dtype/shape/byte offsets, then the raw tensor bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 & friends with numpy before any tensor is read)
import numpy as np

from vimar_jax.convert import spec as spec_lib
from vimar_jax.convert.spec import ConversionError
from vimar_jax.sharding import DEFAULT_RULES

FORMAT_VERSION = 1
VIMAR_JSON = "vimar.json"
CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Our files hold HF tensors that map onto no parameter under this key prefix (never a parameter path).
BUFFER_PREFIX = "hf_buffer/"
# Files never copied along with a checkpoint: weights (any framework) and our own metadata.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
_MAX_HEADER = 100 * 2**20

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CAST_CHOICES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}

if sys.byteorder != "little":  # safetensors is little-endian; we view bytes without swapping
    raise ImportError("vimar_jax.convert.io needs a little-endian host")


def dtype_name(dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ConversionError(f"dtype {dtype} cannot be stored in safetensors") from None


def _is_float(name: str) -> bool:
    return name.startswith(("F", "BF"))


def dotted(path: Sequence[str]) -> str:
    return ".".join(path)


# ----------------------------------------------------------------------------------------------------
# safetensors reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str                  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A validated, memory-mapped safetensors file: `view(key)` gives a read-only numpy view of a tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise ConversionError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self.metadata, self.tensors, self._data_start = self._parse()
            size = os.fstat(self._file.fileno()).st_size
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> ConversionError:
        return ConversionError(f"corrupt safetensors file {self.path}: {why}")

    def _parse(self):
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._corrupt(f"only {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise self._corrupt(f"header length {n} exceeds the file size {size} (truncated or not safetensors)")

        def no_duplicates(pairs):
            d = {}
            for k, v in pairs:
                if k in d:
                    raise self._corrupt(f"tensor {k!r} appears twice in the header")
                d[k] = v
            return d

        try:
            header = json.loads(self._file.read(n).decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise self._corrupt("__metadata__ must map strings to strings")
        tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                dt, shape, (a, b) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                ok = (dt in DTYPES and all(type(s) is int and s >= 0 for s in shape)
                      and type(a) is int and type(b) is int and 0 <= a <= b)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise self._corrupt(f"bad header entry for tensor {key!r}: {entry!r}")
            if b - a != math.prod(shape) * DTYPES[dt].itemsize:
                raise self._corrupt(f"tensor {key!r} of dtype {dt} and shape {list(shape)} spans {b - a} bytes")
            tensors[key] = TensorInfo(dt, shape, a, b)
        data_size = size - 8 - n
        pos = 0
        for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
            if info.end > data_size:
                raise self._corrupt(f"truncated: tensor {key!r} needs bytes up to {info.end} of the data "
                                    f"section, which holds only {data_size} bytes")
            if info.start != pos:
                raise self._corrupt(f"tensor {key!r} starts at byte {info.start}, expected {pos} "
                                    f"(overlapping or gapped tensors)")
            pos = info.end
        if pos != data_size:
            raise self._corrupt(f"{data_size - pos} unexpected bytes after the last tensor")
        return metadata, tensors, 8 + n

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].start)

    @contextlib.contextmanager
    def view(self, key: str, index: int | None = None) -> Iterator[np.ndarray]:
        """Read-only view of tensor `key` (or of its slice `index` along axis 0), valid inside the block.

        The pages are dropped from this process afterwards; copy what you keep.
        """
        info = self.tensors[key]
        dtype = DTYPES[info.dtype]
        shape, start = info.shape, info.start
        if index is not None:
            row = info.nbytes // shape[0]
            shape, start = shape[1:], start + index * row
        count = math.prod(shape)
        begin = self._data_start + start
        arr = np.frombuffer(self._mmap, dtype, count, begin).reshape(shape) if count else np.zeros(shape, dtype)
        try:
            yield arr
        finally:
            del arr
            if count:
                lo = begin - begin % mmap.PAGESIZE
                self._mmap.madvise(mmap.MADV_DONTNEED, lo, begin + count * dtype.itemsize - lo)

    def read(self, key: str) -> np.ndarray:
        with self.view(key) as v:
            return v.copy()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller kept a view; the mapping goes away with it
                pass
            self._mmap = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------
# safetensors writing


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One tensor of a file to write: name, safetensors dtype, shape, and a function producing its array."""
    key: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def header_bytes(tensors: Sequence[OutTensor], metadata: dict | None) -> bytes:
    """The safetensors header for tensors laid out in the given order (padded with spaces to 8 bytes)."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    for t in tensors:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: str | os.PathLike, tensors: Sequence[OutTensor], metadata: dict | None = None,
                      on_tensor: Callable[[OutTensor], None] | None = None) -> int:
    """Stream tensors into a safetensors file: header from the known shapes, then one tensor at a time.

    Returns the number of tensor bytes written.
    """
    header = header_bytes(tensors, metadata)
    total = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            arr = t.produce()
            if tuple(arr.shape) != t.shape or dtype_name(arr.dtype) != t.dtype:
                raise ConversionError(f"tensor {t.key!r} came out as {dtype_name(arr.dtype)} {list(arr.shape)}, "
                                      f"expected {t.dtype} {list(t.shape)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            total += t.nbytes
            del arr
            if on_tensor is not None:
                on_tensor(t)
    return total


def plan_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Group consecutive tensors (given their byte sizes) into files of at most `max_bytes` each
    (a single larger tensor gets a file of its own)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(sizes):
        if not groups or (used + n > max_bytes and groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups or [[]]


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# checkpoint directories


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path.parent} is not a checkpoint directory: no {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{what} {path} is not valid JSON ({e})") from None


class _Files:
    """A set of safetensors files opened lazily, with a key -> file map."""

    def __init__(self, root: Path, weight_map: dict[str, str]):
        self.root = root
        self.weight_map = weight_map
        self._open: dict[str, SafetensorsFile] = {}

    def file(self, name: str) -> SafetensorsFile:
        if name not in self._open:
            self._open[name] = SafetensorsFile(self.root / name)
        return self._open[name]

    def info(self, key: str) -> TensorInfo:
        return self.file(self.weight_map[key]).tensors[key]

    def view(self, key: str, index: int | None = None):
        return self.file(self.weight_map[key]).view(key, index)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _open_files(root: Path) -> tuple[_Files, dict | None, list[str]]:
    """Open the safetensors of a directory: (files, index metadata or None, file names in order).

    Every file is opened (so corrupt headers surface here) and checked against the index.
    """
    index_path = root / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"index {index_path} has no valid 'weight_map'")
        names = list(dict.fromkeys(weight_map.values()))
        files = _Files(root, dict(weight_map))
        for name in names:
            if not (root / name).is_file():
                raise ConversionError(f"shard {root / name} listed in {index_path} does not exist")
            held = files.file(name).tensors
            listed = {k for k, v in weight_map.items() if v == name}
            for k in held.keys() - listed:
                raise ConversionError(f"tensor {k!r} is in shard {root / name} but the index maps it to "
                                      f"{weight_map.get(k, 'no file')}")
            for k in listed - held.keys():
                raise ConversionError(f"index {index_path} maps tensor {k!r} to shard {root / name}, "
                                      f"which does not contain it")
        return files, index.get("metadata"), names
    if (root / SINGLE_FILE).is_file():
        f = SafetensorsFile(root / SINGLE_FILE)
        files = _Files(root, {k: SINGLE_FILE for k in f.tensors})
        files._open[SINGLE_FILE] = f
        return files, None, [SINGLE_FILE]
    present = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    hint = f" (found {', '.join(present)}; pickled torch files are never loaded)" if present else ""
    raise ConversionError(f"{root} is not a checkpoint directory: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class Checkpoint:
    """An opened checkpoint directory (HF or `vimar convert` output).

    `hf` describes the HF tensors: key -> {"dtype", "shape", "file"} (read from the headers, or from
    vimar.json for our directories); `spec` is the model family's CheckpointSpec.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root} is not a checkpoint directory (not a directory)")
        self.config = _read_json(self.root / CONFIG_JSON, "config")
        if not isinstance(self.config, dict):
            raise ConversionError(f"config {self.root / CONFIG_JSON} is not a JSON object")
        self.is_vimar = (self.root / VIMAR_JSON).exists()
        self.files, self.index_metadata, self.file_names = _open_files(self.root)
        try:
            if self.is_vimar:
                self.vimar = _read_json(self.root / VIMAR_JSON, "vimar.json")
                if self.vimar.get("format_version") != FORMAT_VERSION:
                    raise ConversionError(f"{self.root / VIMAR_JSON}: unsupported format_version "
                                          f"{self.vimar.get('format_version')!r} (expected {FORMAT_VERSION})")
                self.hf = _hf_tensors_of(self.vimar, self.root / VIMAR_JSON)
            else:
                self.vimar = None
                self.hf = {k: {"dtype": i.dtype, "shape": list(i.shape), "file": self.files.weight_map[k]}
                           for k in self.files.weight_map for i in [self.files.info(k)]}
            from vimar_jax.convert import registry
            try:
                self.spec = registry.spec_for(self.config, set(self.hf))
            except ConversionError:
                raise
            except (ValueError, KeyError, TypeError) as e:  # the family rejects the config itself
                raise ConversionError(f"{self.root / CONFIG_JSON}: unsupported or invalid config "
                                      f"({type(e).__name__}: {e})") from e
            if self.is_vimar and self.vimar.get("kind") != self.spec.kind:
                raise ConversionError(f"{self.root / VIMAR_JSON} says kind {self.vimar.get('kind')!r} but "
                                      f"config.json gives {self.spec.kind!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def abstract_module(self, dtype=jnp.float32, param_dtype=None):
        from flax import nnx

        param_dtype = dtype if param_dtype is None else param_dtype
        return nnx.eval_shape(lambda: self.spec.make_module(dtype=dtype, param_dtype=param_dtype,
                                                            rngs=nnx.Rngs(0)))

    @property
    def buffer_keys(self) -> list[str]:
        """HF tensors that map onto no parameter (e.g. CLIP's int64 `position_ids`), per the family's
        `layout["buffer_keys"]`: ignored when loading, carried verbatim through a conversion."""
        return [k for k in self.spec.layout.get("buffer_keys", ()) if k in self.hf]

    def check(self, shapes: dict) -> dict:
        """Check the spec's rules against the parameters and the checkpoint; returns path -> [rules]."""
        rules = list(self.spec.rules)
        spec_lib.check_rules(rules, shapes)
        _check_keys(self.root, set(self.hf), {r.hf_key for r in rules} | set(self.buffer_keys),
                    "vimar.json records" if self.is_vimar else "checkpoint has")
        for r in rules:
            got = tuple(self.hf[r.hf_key]["shape"])
            if got != tuple(r.hf_shape):
                raise ConversionError(
                    f"tensor {r.hf_key!r} in {self.root / self.hf[r.hf_key]['file']} has shape {list(got)} but "
                    f"config.json implies {list(r.hf_shape)} (config and weights do not match)")
        if self.is_vimar:
            ours = set(self.files.weight_map)
            _check_keys(self.root, ours, {dotted(p) for p in shapes} | {BUFFER_PREFIX + k for k in self.buffer_keys},
                        "converted checkpoint has")
            for path, (shape, _) in shapes.items():
                got = self.files.info(dotted(path)).shape
                if got != tuple(shape):
                    raise ConversionError(f"parameter {dotted(path)!r} in {self.root} has shape {list(got)} but "
                                          f"config.json implies {list(shape)} (config and weights do not match)")
        by_path: dict = {}
        for r in rules:
            by_path.setdefault(r.path, []).append(r)
        return by_path

    def buffer(self, key: str) -> np.ndarray:
        """An HF buffer tensor (see `buffer_keys`), exactly as stored."""
        stored = BUFFER_PREFIX + key if self.is_vimar else key
        return self.files.file(self.files.weight_map[stored]).read(stored)

    def param(self, path, shape, dtype, rules) -> np.ndarray:
        """One of our parameters as a fresh host array of `dtype` (from our file or from its HF tensors)."""
        dtype = np.dtype(dtype)
        if self.is_vimar:
            with self.files.view(dotted(path)) as v:
                return _owned(v, dtype, v)
        if len(rules) == 1 and rules[0].index is None:
            r = rules[0]
            with self.files.view(r.hf_key) as v:
                return _owned(_checked(r.to_ours(v), shape, r, path), dtype, v)
        buf = np.empty(shape, dtype)
        for r in rules:
            with self.files.view(r.hf_key) as v:
                buf[r.index] = _checked(r.to_ours(v), shape[1:], r, path)
        return buf


def _owned(x: np.ndarray, dtype: np.dtype, source: np.ndarray) -> np.ndarray:
    """`x` as a C-contiguous array of `dtype` that does not alias the memory-mapped `source` (copy only
    when needed: transforms that transpose already made one)."""
    if x.dtype == dtype and x.flags.c_contiguous and not np.may_share_memory(x, source):
        return x
    return np.array(x, dtype=dtype, copy=True, order="C")


def _hf_tensors_of(vimar: dict, where: Path) -> dict:
    """The `hf.tensors` table of a vimar.json, after checking the parts `convert_to_hf` relies on."""
    try:
        hf = vimar["hf"]
        tensors = {k: {"dtype": v["dtype"], "shape": [int(n) for n in v["shape"]], "file": str(v["file"])}
                   for k, v in hf["tensors"].items()}
        files = [(str(f["name"]), f["metadata"], list(f["tensors"])) for f in hf["files"]]
        listed = sorted(k for _, _, keys in files for k in keys)
        ok = listed == sorted(tensors) and all(v["dtype"] in DTYPES for v in tensors.values())
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConversionError(f"{where} is malformed ({type(e).__name__}: {e})") from None
    if not ok:
        raise ConversionError(f"{where} is malformed (its file lists and tensor table disagree)")
    return tensors


def _checked(x: np.ndarray, shape, rule, path) -> np.ndarray:
    if tuple(x.shape) != tuple(shape):
        raise ConversionError(f"HF tensor {rule.hf_key!r} maps to shape {list(x.shape)}, but parameter "
                              f"{dotted(path)}{'' if rule.index is None else f'[{rule.index}]'} has {list(shape)}")
    return x


def _check_keys(root: Path, have: set[str], want: set[str], what: str, limit: int = 8) -> None:
    missing, extra = sorted(want - have), sorted(have - want)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s): {', '.join(map(repr, missing[:limit]))}"
                     + (" ..." if len(missing) > limit else ""))
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s): {', '.join(map(repr, extra[:limit]))}"
                     + (" ..." if len(extra) > limit else ""))
    if parts:
        raise ConversionError(f"{root}: {what} " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------------
# loading into a module


def load_module(path, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=DEFAULT_RULES):
    """Build the model of a checkpoint directory (HF or `vimar convert` output) -> (module, config).

    `dtype` is the compute dtype (default float32); parameters are cast to `param_dtype` (default: `dtype`)
    unless the module fixes a parameter's dtype itself. With a `mesh`, each parameter is placed on the
    NamedSharding its `axes` metadata maps to under `rules`, straight from its host array.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from vimar_jax.sharding import sharding_for

    param_dtype = dtype if param_dtype is None else param_dtype
    with Checkpoint(path) as ckpt:
        abstract = ckpt.abstract_module(dtype, param_dtype)
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        flat = list(nnx.to_flat_state(params))
        shapes = {tuple(str(p) for p in k): (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
                  for k, v in flat}
        by_path = ckpt.check(shapes)
        filled = []
        for k, var in flat:
            p = tuple(str(x) for x in k)
            shape, dt = shapes[p]
            host = ckpt.param(p, shape, dt, by_path.get(p, []))
            if mesh is not None:
                arr = jax.device_put(host, sharding_for(shape, var.get_metadata().get("axes"), mesh, rules))
            else:
                arr = jax.device_put(host)
            del host
            filled.append((k, var.replace(arr)))
        params = nnx.from_flat_state(filled)
    if jax.tree.leaves(rest):
        make = lambda: nnx.split(ckpt.spec.make_module(  # noqa: E731
            dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]
        out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        rest = jax.jit(make, out_shardings=out)()
    return nnx.merge(graphdef, params, rest), ckpt.config


# ----------------------------------------------------------------------------------------------------
# conversion


@dataclasses.dataclass
class Summary:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: int = 0

    def line(self, what: str) -> str:
        gb = self.bytes / 1e9
        return (f"{what}: {self.tensors} tensors, {gb:.3f} GB in {self.files} file(s), {self.seconds:.2f} s "
                f"({gb / max(self.seconds, 1e-9):.2f} GB/s)")


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc=desc, disable=None if enabled is None else not enabled,
                file=sys.stderr)


def _side_files(root: Path) -> list[Path]:
    """Everything in a checkpoint directory that is not weights or our metadata (tokenizer, processor,
    chat template, generation config, ...): top-level files, plus small subdirectories of templates."""
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name in (VIMAR_JSON, INDEX_FILE):
            continue
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
            out.append(p)
        elif p.is_dir() and p.name == "additional_chat_templates":
            out.append(p)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in _side_files(src):
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success it becomes `out` (replacing it only if
    `overwrite`), on failure it is removed and `out` is left untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    for s in sources:
        r, s = out.resolve(), Path(s).resolve()
        if r == s or r in s.parents or s in r.parents:
            raise ConversionError(f"output directory {out} overlaps the input {s}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


GB = 10**9


def convert_to_vimar(hf_dir, out_dir, *, dtype: str = "keep", overwrite: bool = False,
                     max_shard_bytes: int = 5 * GB, progress: bool | None = None) -> Summary:
    """HF checkpoint directory -> our layout (see the module docstring); returns a Summary."""
    if dtype not in CAST_CHOICES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(CAST_CHOICES)}")
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    with Checkpoint(hf_dir) as ckpt:
        if ckpt.is_vimar:
            raise ConversionError(f"{hf_dir} is already a vimar checkpoint ({VIMAR_JSON} present)")
        abstract = ckpt.abstract_module()
        shapes = spec_lib.param_shapes(abstract)
        by_path = ckpt.check(shapes)
        # Our tensors: dtype from the source tensors (or the requested cast for floating ones).
        plan = []
        for path, (shape, _) in shapes.items():
            srcs = sorted({ckpt.hf[r.hf_key]["dtype"] for r in by_path[path]})
            src = srcs[0] if len(srcs) == 1 else "F32"
            out = CAST_CHOICES[dtype] if CAST_CHOICES[dtype] and _is_float(src) else src
            plan.append((path, shape, out))

        bar = _progress(len(ckpt.hf), progress, "convert")
        summary = Summary()

        def produce(path, shape, out):
            def f():
                return ckpt.param(path, shape, DTYPES[out], by_path[path])
            return f

        n_sources = {dotted(p): len(rs) for p, rs in by_path.items()}

        def done(t):
            bar.update(n_sources[t.key])

        tensors = [OutTensor(dotted(p), o, tuple(s), produce(p, s, o)) for p, s, o in plan]
        for k in ckpt.buffer_keys:
            n_sources[BUFFER_PREFIX + k] = 1
            tensors.append(OutTensor(BUFFER_PREFIX + k, ckpt.hf[k]["dtype"], tuple(ckpt.hf[k]["shape"]),
                                     functools.partial(ckpt.buffer, k)))
        groups = plan_shards([t.nbytes for t in tensors], max_shard_bytes)
        names = shard_names(len(groups))
        with atomic_dir(out_dir, overwrite=overwrite, sources=[hf_dir]) as tmp:
            _copy_side_files(hf_dir, tmp)
            for name, group in zip(names, groups):
                summary.bytes += write_safetensors(tmp / name, [tensors[i] for i in group],
                                                   {"format": "vimar"}, on_tensor=done)
            if len(names) > 1:
                _write_json(tmp / INDEX_FILE, {
                    "metadata": {"total_size": summary.bytes},
                    "weight_map": {tensors[i].key: name for name, g in zip(names, groups) for i in g}})
            _write_json(tmp / VIMAR_JSON, {
                "format_version": FORMAT_VERSION,
                "kind": ckpt.spec.kind,
                "layout": ckpt.spec.layout,
                "dtype": dtype,
                "hf": {
                    "sharded": ckpt.index_metadata is not None or len(ckpt.file_names) > 1,
                    "index_metadata": ckpt.index_metadata,
                    "files": [{"name": n, "metadata": ckpt.files.file(n).metadata,
                               "tensors": ckpt.files.file(n).keys()} for n in ckpt.file_names],
                    "tensors": ckpt.hf,
                },
            })
            bar.close()
        summary.tensors, summary.files = len(ckpt.hf), len(names)
    summary.seconds = time.perf_counter() - t0
    return summary


def convert_to_hf(vimar_dir, out_dir, *, overwrite: bool = False, progress: bool | None = None) -> Summary:
    """A `vimar convert` output back to the HF files it came from (same keys, dtypes, shards, metadata)."""
    t0 = time.perf_counter()
    vimar_dir = Path(vimar_dir)
    with Checkpoint(vimar_dir) as ckpt:
        if not ckpt.is_vimar:
            raise ConversionError(f"{vimar_dir} is not a vimar checkpoint (no {VIMAR_JSON})")
        shapes = spec_lib.param_shapes(ckpt.abstract_module())
        ckpt.check(shapes)
        rule_of = {r.hf_key: r for r in ckpt.spec.rules}
        hf = ckpt.vimar["hf"]
        bar = _progress(len(ckpt.hf), progress, "to-hf")
        summary = Summary()

        def produce(key):
            if key not in rule_of:
                return functools.partial(ckpt.buffer, key)
            r, want = rule_of[key], DTYPES[ckpt.hf[key]["dtype"]]

            def f():
                with ckpt.files.view(dotted(r.path), r.index) as v:
                    return _owned(r.to_hf(v), want, v)
            return f

        with atomic_dir(out_dir, overwrite=overwrite, sources=[vimar_dir]) as tmp:
            _copy_side_files(vimar_dir, tmp)
            for entry in hf["files"]:
                tensors = [OutTensor(k, ckpt.hf[k]["dtype"], tuple(ckpt.hf[k]["shape"]), produce(k))
                           for k in entry["tensors"]]
                summary.bytes += write_safetensors(tmp / entry["name"], tensors, entry["metadata"],
                                                   on_tensor=lambda t: bar.update(1))
            if hf["sharded"]:
                _write_json(tmp / INDEX_FILE, {
                    "metadata": hf["index_metadata"],
                    "weight_map": {k: v["file"] for k, v in ckpt.hf.items()}}, sort_keys=True)
            bar.close()
        summary.tensors, summary.files = len(ckpt.hf), len(hf["files"])
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_json(path: Path, obj, sort_keys: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, default=str)
        f.write("\n")
