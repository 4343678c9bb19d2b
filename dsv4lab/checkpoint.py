"""Read one layer of a DSv4 safetensors checkpoint, inspect its tensor table, load it into the layer modules.

Layout (dsv4-layers.md 1.3, 5, 6): an HF directory (``config.json``, ``model.safetensors.index.json`` + shards, or
one ``.safetensors`` file) with tensors named ``layers.N.<name>``, ``mtp.K.<name>`` (the MTP block, which vLLM
remaps to decoder index ``num_hidden_layers + K``) and top-level ``embed.weight``, ``head.weight``,
``norm.weight``, ``hc_head_{fn,base,scale}``. Stored formats:

- fp8 linears: ``X.weight`` F8_E4M3 [out, in] + ``X.scale`` F8_E8M0 [ceil(out/128), ceil(in/128)];
  value = e4m3 * 2^(scale_byte - 127) per 128x128 block.
- routed experts (MXFP4): ``ffn.experts.{e}.w1.weight`` I8 [I, D/2] (two e2m1 codes per byte, low nibble
  first) + ``.scale`` F8_E8M0 [I, D/32] (one UE8M0 per 1x32 block); same for w3, w2 [D, I/2] + [D, I/32].
- BF16 norms / gate / compressor / indexer weights, F32 mHC parameters, attn_sink, ape, gate bias;
  ``ffn.gate.tid2eid`` I64 [V, k] on hash layers.

The expected tensors of a layer come from ``sizing.layer_params`` (its ``ffn.experts.*`` placeholder is expanded
to one tensor per expert). A safetensors file is ``u64 little-endian header length | JSON header | data``; the
header gives every tensor's dtype tag, shape and byte range, so ``inspect`` reads headers only and ``load_layer``
checks every needed header entry (presence, dtype tag, shape, byte range, file size) before reading any data,
then reads only the selected tensors through memory-mapped ``safetensors.safe_open``.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, TextIO

import numpy as np
import torch

from . import sizing
from .config import DSv4Config
from .quant import HAS_E8M0_DTYPE, dequant_fp4, dequant_fp8, float_to_ue8m0, quant_fp4, quant_fp8, ue8m0_to_float

INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
MAX_HEADER_BYTES = 256 * 1024 * 1024     # a header beyond this is a corrupt length field, not a real header

# safetensors dtype tag -> bytes per element (the tags safetensors 0.8 writes)
TAG_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOAT_TAGS = ("BF16", "F32", "F16")
# stored dtype in sizing -> tags accepted on disk. fp8/fp4/int64 tags are confirmed by the published shard
# headers; the non-quantised rows' dtypes are not (dsv4-layers.md 1.3), so any float tag is read as stored.
# UE8M0 scales and packed e2m1 bytes are also accepted as plain U8 (some converters write them so).
ACCEPTED_TAGS = {"fp8": ("F8_E4M3",), "e8m0": ("F8_E8M0", "U8"), "fp4x2": ("I8", "U8"), "int64": ("I64",),
                 "bf16": _FLOAT_TAGS, "fp32": _FLOAT_TAGS}
PREFERRED_TAG = {"fp8": "F8_E4M3", "e8m0": "F8_E8M0", "fp4x2": "I8", "int64": "I64", "bf16": "BF16", "fp32": "F32"}
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(.+)$")


# ---- headers --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor's header entry: dtype tag, shape, absolute byte range ``[start, end)`` in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    file: str
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int          # 8 + header length
    file_size: int

    @property
    def data_end(self) -> int:
        """Where the data section must end for every entry to be readable."""
        return max((e.end for e in self.entries.values()), default=self.data_start)

    @property
    def truncated(self) -> bool:
        return self.file_size < self.data_end


def read_header(file: str | os.PathLike) -> Header:
    """Parse a safetensors header (8-byte little-endian length + JSON) without touching the data section."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise ValueError(f"file: no safetensors file at {file!r}")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: shorter than the 8-byte safetensors header length ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{file}: header length {n} does not fit the file ({size} bytes): truncated or not safetensors")
        raw = f.read(n)
    try:
        js = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(js, dict):
        raise ValueError(f"{file}: header is not a JSON object")
    meta = js.pop("__metadata__", None) or {}
    entries = {}
    for name, info in js.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: malformed header entry for tensor {name!r}: {info!r}") from None
        if not 0 <= int(lo) <= int(hi):
            raise ValueError(f"{file}: tensor {name!r} has bad data_offsets {[lo, hi]}")
        entries[name] = Entry(name, str(dtype), shape, 8 + n + int(lo), 8 + n + int(hi), file)
    return Header(file, entries, dict(meta), 8 + n, size)


# ---- checkpoint directory -----------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint on disk: ``weight_map`` (tensor name -> shard path) and the config path if present.

    Shard headers are parsed lazily, once each (``header(file)``)."""

    root: str
    weight_map: dict[str, str]
    config_path: str | None
    _headers: dict[str, Header] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """``path``: a directory (with ``model.safetensors.index.json``, or one or more ``*.safetensors``)
        or a single ``.safetensors`` file."""
        path = os.fspath(path)
        if os.path.isfile(path):
            root = os.path.dirname(os.path.abspath(path))
            ck = cls(root, {}, _config_in(root))
            ck.weight_map = {name: path for name in ck.header(path).entries}
            return ck
        if not os.path.isdir(path):
            raise ValueError(f"path: no checkpoint directory or .safetensors file at {path!r}")
        root = os.path.abspath(path)
        index = os.path.join(root, INDEX_FILE)
        ck = cls(root, {}, _config_in(root))
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from None
            ck.weight_map = {name: os.path.join(root, shard) for name, shard in wm.items()}
            return ck
        shards = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"path: {root!r} has neither {INDEX_FILE} nor any .safetensors file")
        for shard in shards:
            file = os.path.join(root, shard)
            for name in ck.header(file).entries:
                if name in ck.weight_map:
                    raise ValueError(f"tensor {name!r} appears in both {ck.weight_map[name]} and {file}")
                ck.weight_map[name] = file
        return ck

    def header(self, file: str) -> Header:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def config(self) -> DSv4Config:
        if self.config_path is None:
            raise ValueError(f"path: no config.json next to the checkpoint in {self.root!r} (pass cfg=...)")
        return DSv4Config.from_hf_config(self.config_path)


def _config_in(root: str) -> str | None:
    p = os.path.join(root, "config.json")
    return p if os.path.isfile(p) else None


# ---- layer selection and the expected-tensor table ----------------------------------------------------
def layer_prefix(layer: int | str, cfg: DSv4Config | None = None) -> str:
    """Checkpoint name prefix of a layer selector: ``3`` / ``"3"`` / ``"layers.3"`` -> ``"layers.3."``;
    ``"mtp"`` / ``"mtp.0"`` -> ``"mtp.0."``; ``num_hidden_layers + K`` (vLLM's MTP index) -> ``"mtp.K."``;
    ``"top"`` -> ``""`` (embed / head / norm / hc_head)."""
    if isinstance(layer, str):
        s = layer.strip()
        if s == "top":
            return ""
        if s == "mtp":
            return "mtp.0."
        m = re.fullmatch(r"mtp\.(\d+)\.?", s)
        if m:
            return f"mtp.{int(m.group(1))}."
        m = re.fullmatch(r"(?:layers\.)?(\d+)\.?", s)
        if not m:
            raise ValueError(f"layer: expected an index, 'mtp', 'mtp.K' or 'top', got {layer!r}")
        layer = int(m.group(1))
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer: expected a non-negative index, 'mtp' or 'top', got {layer!r}")
    if cfg is not None and layer >= cfg.num_hidden_layers:
        k = layer - cfg.num_hidden_layers
        if k >= cfg.num_nextn_predict_layers:
            raise ValueError(f"layer: {layer} is past the {cfg.num_hidden_layers} decoder layers and "
                             f"{cfg.num_nextn_predict_layers} MTP layer(s) of the config")
        return f"mtp.{k}."
    return f"layers.{layer}."


def group_of(name: str) -> str:
    """``layers.N`` / ``mtp.K`` / ``top`` for a full checkpoint tensor name."""
    m = re.match(r"^(layers|mtp)\.(\d+)\.", name)
    return f"{m.group(1)}.{m.group(2)}" if m else "top"


def _in_group(name: str, prefix: str) -> bool:
    return group_of(name) == "top" if prefix == "" else name.startswith(prefix)


def expected_tensors(cfg: DSv4Config, prefix: str) -> dict[str, sizing.Tensor]:
    """Relative name -> ``sizing.Tensor`` (shape, stored dtype) of every tensor under ``prefix``.

    ``ffn.experts.*.w`` rows of sizing (shape [E, out, in']) become one ``ffn.experts.{e}.w`` per expert."""
    if prefix == "":
        table = sizing.top_level_params(cfg)
    elif prefix.startswith("mtp."):
        table = sizing.layer_params(cfg, cfg.num_hidden_layers + int(prefix.split(".")[1]), mtp=True)
    else:
        layer = int(prefix.split(".")[1])
        if layer >= cfg.num_hidden_layers:
            raise ValueError(f"layer: {layer} >= num_hidden_layers={cfg.num_hidden_layers}")
        table = sizing.layer_params(cfg, layer)
    out: dict[str, sizing.Tensor] = {}
    for t in table:
        if not t.name.startswith("ffn.experts.*."):
            out[t.name] = t
            continue
        rest = t.name[len("ffn.experts.*."):]
        for e in range(t.shape[0]):
            out[f"ffn.experts.{e}.{rest}"] = sizing.Tensor(f"ffn.experts.{e}.{rest}", t.shape[1:], t.dtype, t.group)
    return out


def _check_entry(full: str, entry: Entry, spec: sizing.Tensor) -> list[str]:
    problems = []
    if entry.dtype not in TAG_BYTES:
        return [f"tensor {full!r} in {entry.file}: unknown dtype tag {entry.dtype!r} (expected {PREFERRED_TAG[spec.dtype]})"]
    if entry.dtype not in ACCEPTED_TAGS[spec.dtype]:
        problems.append(f"tensor {full!r} in {entry.file}: dtype {entry.dtype}, expected "
                        f"{' or '.join(ACCEPTED_TAGS[spec.dtype])} ({spec.dtype})")
    if entry.shape != tuple(spec.shape):
        problems.append(f"tensor {full!r} in {entry.file}: shape {list(entry.shape)}, the config expects {list(spec.shape)}")
    if entry.nbytes != entry.numel * TAG_BYTES[entry.dtype]:
        problems.append(f"tensor {full!r} in {entry.file}: byte range of {entry.nbytes} bytes does not hold "
                        f"{list(entry.shape)} {entry.dtype}")
    return problems


def _raise(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]) + more)


def plan_layer(ck: Checkpoint, cfg: DSv4Config, layer: int | str, experts: Iterable[int] | None = None,
               strict: bool = True) -> tuple[str, dict[str, tuple[Entry, sizing.Tensor]]]:
    """Validate every header entry the layer needs (no data read) -> ``(prefix, {relative name: (entry, spec)})``.

    Raises one ValueError listing every missing tensor, wrong dtype tag / shape / byte range, truncated shard and
    (``strict``) every unexpected tensor under the layer's prefix."""
    prefix = layer_prefix(layer, cfg)
    specs = all_specs = expected_tensors(cfg, prefix)
    if experts is not None:
        keep = {int(e) for e in experts}
        bad = sorted(e for e in keep if not 0 <= e < cfg.n_routed_experts)
        if bad:
            raise ValueError(f"experts: ids {bad} outside [0, {cfg.n_routed_experts})")
        specs = {k: v for k, v in specs.items() if not (m := _EXPERT.match(k)) or int(m.group(1)) in keep}
    problems, plan = [], {}
    for rel, spec in specs.items():
        full = prefix + rel
        file = ck.weight_map.get(full)
        if file is None:
            problems.append(f"tensor {full!r} is missing from the checkpoint (expected {list(spec.shape)} "
                            f"{PREFERRED_TAG[spec.dtype]})")
            continue
        header = ck.header(file)
        entry = header.entries.get(full)
        if entry is None:
            problems.append(f"tensor {full!r}: the index maps it to {file}, whose header does not list it")
            continue
        problems += _check_entry(full, entry, spec)
        plan[rel] = (entry, spec)
    for file in sorted({e.file for e, _ in plan.values()}):   # safe_open refuses a short file as a whole
        h = ck.header(file)
        if h.truncated:
            problems.append(f"shard {file} is truncated: {h.file_size} bytes, its header needs {h.data_end}")
    if strict:
        expected_full = {prefix + r for r in all_specs}
        extra = sorted(n for n in ck.weight_map if _in_group(n, prefix) and n not in expected_full)
        problems += [f"tensor {n!r} in {ck.weight_map[n]} is not expected for this layer by the config "
                     f"(strict=False ignores it)" for n in extra]
    _raise(problems, f"checkpoint {ck.root}, layer {prefix.rstrip('.') or 'top'}")
    return prefix, plan


# ---- reading --------------------------------------------------------------------------------------------
def _read_bytes(entry: Entry) -> torch.Tensor:
    """A one-byte-per-element entry as uint8 of its shape, read through a memory map (the UE8M0 fallback for a
    torch without ``float8_e8m0fnu``)."""
    if TAG_BYTES[entry.dtype] != 1:
        raise ValueError(f"tensor {entry.name!r}: raw byte reads are for 1-byte dtypes, got {entry.dtype}")
    mm = np.memmap(entry.file, dtype=np.uint8, mode="r", offset=entry.start, shape=(entry.nbytes,))
    return torch.from_numpy(np.array(mm)).reshape(entry.shape)


def _read_all(plan: dict[str, tuple[Entry, sizing.Tensor]]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for rel, (entry, _) in plan.items():
        by_file.setdefault(entry.file, []).append(rel)
    for file, rels in by_file.items():
        with safe_open(file, framework="pt") as f:
            for rel in rels:
                entry = plan[rel][0]
                try:
                    out[rel] = f.get_tensor(entry.name)
                except Exception:                     # noqa: BLE001 -- torch without float8_e8m0fnu
                    if entry.dtype != "F8_E8M0":
                        raise
                    out[rel] = _read_bytes(entry)     # UE8M0 bytes as uint8
    return out


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * 2^(scale_byte-127)`` per 128x128 block; the last row/column blocks may be partial (scale shape
    ``[ceil(out/128), ceil(in/128)]``). Exact in bf16 for e4m3 values times powers of two."""
    out, inp = q.shape
    br, bc = FP8_BLOCK
    want = (-(-out // br), -(-inp // bc))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale: expected {list(want)} for weight {list(q.shape)}, got {list(scale.shape)}")
    if out % br == 0 and inp % bc == 0:
        return dequant_fp8(q, scale, FP8_BLOCK, dtype=dtype)
    s = ue8m0_to_float(scale) if scale.dtype != torch.float32 else scale
    s = s.repeat_interleave(br, 0)[:out].repeat_interleave(bc, 1)[:, :inp]
    return (q.float() * s).to(dtype)


def dequantize_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed e2m1 (int8/uint8 [out, in/2]) with UE8M0 1x32 scales [out, in/32] -> ``dtype`` [out, in]."""
    s = scale.view(torch.uint8) if scale.dtype != torch.float32 else scale
    return dequant_fp4(packed.view(torch.uint8), s, FP4_BLOCK, dtype=dtype)


def dequantize_layer(raw: dict[str, torch.Tensor], specs: dict[str, sizing.Tensor],
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Fold every ``X.weight`` + ``X.scale`` pair (fp8 128x128 or packed fp4 1x32) into one ``X.weight`` of
    ``dtype``; other tensors are passed through as stored."""
    out = {}
    for name, t in raw.items():
        kind = specs[name].dtype
        if kind == "e8m0":
            continue
        if kind in ("fp8", "fp4x2"):
            sname = name[: -len(".weight")] + ".scale"
            if sname not in raw:
                raise ValueError(f"{name}: its scale {sname!r} was not loaded")
            fn = dequantize_fp8_weight if kind == "fp8" else dequantize_fp4_weight
            out[name] = fn(t, raw[sname], dtype)
        else:
            out[name] = t
    return out


def load_layer(path: str | os.PathLike | Checkpoint, layer: int | str, dequantize: bool = True, *,
               dtype: torch.dtype = torch.bfloat16, cfg: DSv4Config | None = None,
               experts: Iterable[int] | None = None, strict: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of one layer, keyed by its name relative to the layer (``attn.wq_a.weight``,
    ``ffn.experts.3.w1.weight``, ``hc_attn_fn``; top level: ``embed.weight``).

    ``layer``: index N, ``"mtp"`` / ``"mtp.K"`` / ``num_hidden_layers + K``, or ``"top"``.
    ``dequantize=True``: fp8 and packed-fp4 weights become ``dtype`` (their ``.scale`` keys disappear); other
    tensors keep their stored dtype. ``dequantize=False``: exactly as stored (fp8 as ``float8_e4m3fn``, packed
    fp4 as int8, scales as ``float8_e8m0fnu`` -- or uint8 bytes where torch lacks that dtype, or the file says U8).
    ``cfg``: defaults to the checkpoint's ``config.json``. ``experts``: load only these routed experts (a Flash
    layer's 256 experts are 3.2 GB packed and 13 GB dequantised to bf16).
    All header entries are validated before any data is read; on any problem nothing is returned.
    """
    ck = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    cfg = cfg or ck.config()
    _, plan = plan_layer(ck, cfg, layer, experts=experts, strict=strict)
    raw = _read_all(plan)
    if not dequantize:
        return raw
    return dequantize_layer(raw, {k: s for k, (_, s) in plan.items()}, dtype)


# ---- into the layer modules -----------------------------------------------------------------------------
# checkpoint name (relative to its layer) -> module attribute, for dsv4lab.layers:
#   hc_{attn,ffn}_{fn,base,scale}      -> hc_{attn,ffn}.{fn,base,scale}         (MHC modules)
#   hc_head_{fn,base,scale}            -> hc_head.{fn,base,scale}               (HCHead; model top level and MTP)
#   ffn.shared_experts.{w1,w2,w3}.weight (+ .scale) -> ffn.shared_experts.{w1,w2,w3}   (dequantised)
#   ffn.experts.{e}.{w}.weight         -> ffn.experts.{w}[e]        (packed e2m1 bytes, kept packed)
#   ffn.experts.{e}.{w}.scale          -> ffn.experts.{w}_scale[e]  (UE8M0 bytes)
#   other fp8 X.weight + X.scale       -> X.weight                               (dequantised)
#   MTP: decoder-block names           -> block.<decoder mapping>; e_proj/h_proj/enorm/hnorm/norm/hc_head_* direct
#   everything else                    -> the same dotted name
_MTP_OWN = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head_")


def module_attribute(name: str, target: str = "decoder") -> tuple[str, int | None]:
    """``(dotted module attribute, expert index or None)`` for a relative checkpoint name (after dequantisation,
    i.e. fp8 scales folded in). ``target``: "decoder" (DecoderLayer), "mtp" (MTP), "top" (Model top level)."""
    if target == "mtp":
        if name.startswith(_MTP_OWN):
            return module_attribute(name, "top")
        attr, e = module_attribute(name, "decoder")
        return "block." + attr, e
    m = re.fullmatch(r"hc_(attn|ffn|head)_(fn|base|scale)", name)
    if m:
        return f"hc_{m.group(1)}.{m.group(2)}", None
    m = re.fullmatch(r"ffn\.shared_experts\.(w[123])\.weight", name)
    if m:
        return f"ffn.shared_experts.{m.group(1)}", None
    m = re.fullmatch(r"ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)", name)
    if m:
        return f"ffn.experts.{m.group(2)}" + ("_scale" if m.group(3) == "scale" else ""), int(m.group(1))
    return name, None


def _module_target(module: torch.nn.Module, layer: int | str | None) -> tuple[torch.nn.Module, str, int | str]:
    """(sub-module to fill, mapping target, layer selector) for a DecoderLayer, MTP or Model."""
    kind = type(module).__name__
    if kind == "Model":
        if layer is None:
            raise ValueError("layer: a Model needs a layer (index, 'mtp' or 'top')")
        prefix = layer_prefix(layer, module.cfg)
        if prefix == "":
            return module, "top", "top"
        if prefix.startswith("mtp."):
            if module.mtp is None:
                raise ValueError("module: this Model has no MTP layer (built with mtp=False)")
            return module.mtp, "mtp", prefix.rstrip(".")
        return module.layers[int(prefix.split(".")[1])], "decoder", prefix.rstrip(".")
    if kind == "MTP":
        return module, "mtp", "mtp" if layer is None else layer
    if kind == "DecoderLayer":
        return module, "decoder", module.layer_idx if layer is None else layer
    raise TypeError(f"module: expected a dsv4lab.layers DecoderLayer, MTP or Model, got {kind}")


def _to_module_dtype(name: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    if src.dtype == dst.dtype:
        return src
    one_byte = (torch.int8, torch.uint8) + ((torch.float8_e8m0fnu,) if HAS_E8M0_DTYPE else ())
    if src.dtype in one_byte and dst.dtype in (torch.int8, torch.uint8):
        return src.view(dst.dtype)               # packed e2m1 / UE8M0 bytes: same bits
    if src.dtype in one_byte and dst.dtype == torch.float32:
        return ue8m0_to_float(src.view(torch.uint8))
    out = src.to(dst.dtype)
    if not torch.equal(out.to(src.dtype), src):
        raise ValueError(f"tensor {name!r}: {src.dtype} values do not fit the module's {dst.dtype} exactly")
    return out


def _match_module(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], kind: str, prefix: str
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """(destination view, source in the destination dtype) pairs, and every mismatch found both ways."""
    copies, problems, seen, experts_done = [], [], set(), {}
    for name, src in tensors.items():
        attr, expert = module_attribute(name, kind)
        full = prefix + name
        if attr not in own:
            problems.append(f"checkpoint tensor {full!r}: the module has no parameter/buffer {attr!r}")
            continue
        seen.add(attr)
        dst = own[attr]
        if expert is not None:
            if expert >= dst.shape[0]:
                problems.append(f"checkpoint tensor {full!r}: module {attr!r} {list(dst.shape)} has no expert {expert}")
                continue
            dst = dst[expert]
            experts_done.setdefault(attr, set()).add(expert)
        if tuple(dst.shape) != tuple(src.shape):
            where = attr if expert is None else f"{attr}[{expert}]"
            problems.append(f"checkpoint tensor {full!r} {list(src.shape)} -> module {where!r} {list(dst.shape)}")
            continue
        try:
            copies.append((dst, _to_module_dtype(full, src, dst)))
        except ValueError as e:
            problems.append(str(e))
    group = prefix.rstrip(".") or "top"
    for attr, t in own.items():
        if attr not in seen:
            problems.append(f"module tensor {attr!r} has no checkpoint tensor in {group}")
        elif attr in experts_done and experts_done[attr] != set(range(t.shape[0])):
            missing = sorted(set(range(t.shape[0])) - experts_done[attr])
            problems.append(f"module buffer {attr!r}: experts {missing} are not in the checkpoint layer {group}")
    return copies, problems


def load_into(module: torch.nn.Module, path: str | os.PathLike | Checkpoint, layer: int | str | None = None, *,
              strict: bool = True) -> torch.nn.Module:
    """Copy one checkpoint layer into a ``dsv4lab.layers`` module: a ``DecoderLayer`` (layer defaults to its
    ``layer_idx``), an ``MTP`` (``"mtp"``) or a ``Model`` (``layer`` = index -> ``model.layers[N]``, ``"mtp"``,
    ``"top"`` -> embed/head/norm/hc_head). fp8 weights are dequantised to the module's bf16, routed experts stay
    packed. Every checkpoint tensor must find its module attribute with the same shape (and every module tensor
    must be covered); all of it is checked after loading and before the first copy, so on error the module is
    unchanged. The config is the module's ``cfg``. Returns ``module``."""
    target, kind, layer = _module_target(module, layer)
    cfg = module.cfg
    ck = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    raw = load_layer(ck, layer, dequantize=False, cfg=cfg, strict=strict)
    prefix = layer_prefix(layer, cfg)
    fp8 = {n for n, s in expected_tensors(cfg, prefix).items() if s.dtype == "fp8"}
    tensors = {}     # fp8 folded to fp32 (exact; the module dtype cast below checks it stays exact), rest as stored
    for name, t in raw.items():
        if name in fp8:
            tensors[name] = dequantize_fp8_weight(t, raw[name[: -len(".weight")] + ".scale"], torch.float32)
        elif not (name.endswith(".scale") and name[: -len(".scale")] + ".weight" in fp8):
            tensors[name] = t
    own = dict(target.named_parameters()) | dict(target.named_buffers())
    if kind == "top":      # a Model's top level: not its layers / MTP
        own = {k: v for k, v in own.items() if not k.startswith(("layers.", "mtp."))}
    copies, problems = _match_module(tensors, own, kind, prefix)
    _raise(problems, f"load_into {type(module).__name__} from {ck.root}, layer {prefix.rstrip('.') or 'top'}")
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
    return module


# ---- inspect --------------------------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _ranges(ids: list[int]) -> str:
    ids, parts, i = sorted(ids), [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}..{ids[j]}")
        i = j + 1
    return "{" + ",".join(parts) + "}"


def inspect_rows(ck: Checkpoint, layer: int | str | None = None, cfg: DSv4Config | None = None
                 ) -> dict[str, list[Entry]]:
    """Header entries grouped per layer (``top``, ``layers.N`` ascending, ``mtp.K``); headers only."""
    want = None if layer is None else group_of(layer_prefix(layer, cfg) or "top")
    groups: dict[str, list[Entry]] = {}
    for name in sorted(ck.weight_map):
        g = group_of(name)
        if want is not None and g != want:
            continue
        header = ck.header(ck.weight_map[name])
        entry = header.entries.get(name)
        if entry is None:
            raise ValueError(f"tensor {name!r}: the index maps it to {ck.weight_map[name]}, whose header does not list it")
        groups.setdefault(g, []).append(entry)

    def order(g: str) -> tuple[int, int]:
        return (0, 0) if g == "top" else ((1 if g.startswith("layers.") else 2), int(g.split(".")[1]))
    return {g: groups[g] for g in sorted(groups, key=order)}


def _check_group(cfg: DSv4Config, group: str, entries: list[Entry]) -> list[str]:
    prefix = "" if group == "top" else group + "."
    try:
        specs = expected_tensors(cfg, prefix)
    except ValueError as e:
        return [str(e)]
    have = {e.name[len(prefix):]: e for e in entries}
    out = [f"missing {prefix + n} {list(s.shape)} {PREFERRED_TAG[s.dtype]}" for n, s in specs.items() if n not in have]
    out += [f"unexpected {e.name}" for n, e in have.items() if n not in specs]
    for n, e in have.items():
        if n in specs:
            out += _check_entry(e.name, e, specs[n])
    return out


def format_inspect(path: str | os.PathLike, layer: int | str | None = None, *, expand_experts: bool = False,
                   cfg: DSv4Config | None = None) -> tuple[str, int]:
    """The layer table as text and the number of problems found (headers only; no tensor data is read).

    Per layer: name, shape, dtype tag, bytes, shard; routed-expert tensors with equal shape and dtype are
    collapsed to one row ``ffn.experts.{0..E-1}.w1.weight  xE`` unless ``expand_experts``. With a config.json
    (or ``cfg``) every group is checked against the expected table (missing / unexpected / dtype / shape)."""
    ck = Checkpoint.open(path)
    if cfg is None and ck.config_path is not None:
        cfg = ck.config()
    groups = inspect_rows(ck, layer, cfg)
    if layer is not None and not groups:
        raise ValueError(f"layer: no tensors for {layer!r} in {ck.root}")
    lines, n_problems = [], 0
    total_bytes = sum(e.nbytes for es in groups.values() for e in es)
    lines.append(f"checkpoint {ck.root}: {len(ck.shards)} shard(s), {sum(len(v) for v in groups.values())} tensors shown, "
                 f"{_fmt_bytes(total_bytes)}; config: "
                 + (f"{cfg.name} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers + "
                    f"{cfg.num_nextn_predict_layers} MTP)" if cfg else "none (no shape checks)"))
    shown = {e.file for es in groups.values() for e in es}
    for file in sorted(shown):
        h = ck.header(file)
        if h.truncated:
            n_problems += 1
            lines.append(f"!! shard {os.path.basename(file)} is truncated: {h.file_size} bytes, header needs {h.data_end}")
    for group, entries in groups.items():
        rows: list[tuple[str, str, str, int, str]] = []
        prefix = "" if group == "top" else group + "."
        collapsed: dict[tuple, list[tuple[int, Entry]]] = {}
        for e in entries:
            m = _EXPERT.match(e.name[len(prefix):])
            if m and not expand_experts:
                collapsed.setdefault((m.group(2), e.shape, e.dtype), []).append((int(m.group(1)), e))
            else:
                rows.append((e.name[len(prefix):], str(list(e.shape)), e.dtype, e.nbytes, os.path.basename(e.file)))
        for (rest, shape, dtype), members in collapsed.items():
            files = {os.path.basename(e.file) for _, e in members}
            shard = files.pop() if len(files) == 1 else f"{len(files)} shards"
            rows.append((f"ffn.experts.{_ranges([i for i, _ in members])}.{rest}  x{len(members)}", str(list(shape)),
                         dtype, sum(e.nbytes for _, e in members), shard))
        by_dtype: dict[str, int] = {}
        for e in entries:
            by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
        title = group
        if cfg is not None and group.startswith("layers."):
            i = int(group.split(".")[1])
            if i < cfg.num_hidden_layers:
                r = cfg.compress_ratio(i)
                title += f"  (ratio {r}: {dict([(0, 'window'), (4, 'CSA'), (128, 'HCA')]).get(r, r)}, " \
                         f"{'hash' if cfg.is_hash_layer(i) else 'bias'} routing)"
        lines.append("")
        lines.append(f"== {title}: {len(entries)} tensors, {_fmt_bytes(sum(by_dtype.values()))}")
        w = max([len(r[0]) for r in rows] + [4])
        sw = max([len(r[1]) for r in rows] + [5])
        lines.append(f"  {'name':<{w}}  {'shape':<{sw}}  {'dtype':<8} {'bytes':>12}  shard")
        for name, shape, dtype, nbytes, shard in rows:
            lines.append(f"  {name:<{w}}  {shape:<{sw}}  {dtype:<8} {nbytes:>12}  {shard}")
        lines.append("  total: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(by_dtype.items())))
        if cfg is not None:
            problems = _check_group(cfg, group, entries)
            n_problems += len(problems)
            lines.append("  check: ok" if not problems else f"  check: {len(problems)} problem(s)")
            lines += [f"    - {p}" for p in problems[:50]]
            if len(problems) > 50:
                lines.append(f"    ... and {len(problems) - 50} more")
    lines.append("")
    lines.append(f"total: {sum(len(v) for v in groups.values())} tensors, {_fmt_bytes(total_bytes)}, "
                 f"{n_problems} problem(s)")
    return "\n".join(lines), n_problems


def main_inspect(path: str | os.PathLike, layer: int | str | None = None, *, expand_experts: bool = False,
                 out: TextIO | None = None) -> int:
    """``dsv4lab inspect <path> [--layer L]``: print the layer table; exit code 0 if the checkpoint matches its
    config (or has none), 1 if problems were found (missing / unexpected tensors, dtype, shape, truncation)."""
    text, n_problems = format_inspect(path, layer, expand_experts=expand_experts)
    print(text, file=out or sys.stdout)
    return 1 if n_problems else 0


# ---- notebook / compare hook ---------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One checkpoint layer, dequantised (``tensors``: relative names as in ``load_layer``) with its config.

    ``op_inputs(op, ...)`` gives the ``(args, kwargs)`` of ``kernels.inputs.make_inputs`` with the weight
    arguments replaced by this layer's tensors (activations stay synthetic unit-RMS); ``module()`` builds the
    layer module (DecoderLayer / MTP) and loads these weights into it."""

    cfg: DSv4Config
    prefix: str                       # "layers.N." / "mtp.K." / ""
    tensors: dict[str, torch.Tensor]
    path: str

    @property
    def layer_idx(self) -> int | None:
        if self.prefix.startswith("layers."):
            return int(self.prefix.split(".")[1])
        if self.prefix.startswith("mtp."):
            return self.cfg.num_hidden_layers + int(self.prefix.split(".")[1])
        return None

    def _t(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"{self.prefix.rstrip('.') or 'top'} has no tensor {name!r} "
                             f"(this op needs a different layer: an index, 'mtp' or 'top')")
        return self.tensors[name]

    def op_inputs(self, op: str, tokens: int = 64, *, seed: int = 0, device: str | torch.device = "cpu",
                  sublayer: str = "attn") -> tuple[tuple[Any, ...], dict[str, Any]]:
        from .kernels import inputs as kin

        if sublayer not in ("attn", "ffn"):
            raise ValueError(f"sublayer: expected 'attn' or 'ffn', got {sublayer!r}")
        s = sublayer
        norm = "norm.weight" if self.prefix == "" else f"{s}_norm.weight"
        swaps: dict[str, dict[int | str, str]] = {
            "mhc_pre": {1: f"hc_{s}_fn", 2: f"hc_{s}_scale", 3: f"hc_{s}_base", 4: f"{s}_norm.weight"},
            "mhc_fused_post_pre": {4: f"hc_{s}_fn", 5: f"hc_{s}_scale", 6: f"hc_{s}_base", 7: f"{s}_norm.weight"},
            "hc_head": {1: "hc_head_fn", 2: "hc_head_scale", 3: "hc_head_base"},
            "rmsnorm": {1: norm},
            "router_gemm": {1: "ffn.gate.weight"},
            "mtp_input_rmsnorm": {3: "enorm.weight", 4: "hnorm.weight"},
            "mtp_shared_head_rmsnorm": {1: "norm.weight"},
            "moe_routing": {"bias": "ffn.gate.bias"},
        }
        if op not in swaps:
            raise ValueError(f"op: checkpoint weights are wired for {sorted(swaps)}, not {op!r}")
        args, kwargs = kin.make_inputs(op, self.cfg, tokens, device=device, seed=seed)
        args = list(args)
        if op == "moe_routing" and "ffn.gate.tid2eid" in self.tensors:   # hash layer: route by token id
            kwargs.pop("bias", None)
            g = torch.Generator().manual_seed(seed)
            kwargs["tid2eid"] = self.tensors["ffn.gate.tid2eid"].to(device)
            kwargs["input_ids"] = torch.randint(0, self.cfg.vocab_size, (tokens,), generator=g).to(device)
            return tuple(args), kwargs
        for where, name in swaps[op].items():
            real = self._t(name).to(device)
            old = args[where] if isinstance(where, int) else kwargs[where]
            if tuple(old.shape) != tuple(real.shape):
                raise ValueError(f"op {op!r}: input {where} of make_inputs has shape {list(old.shape)}, "
                                 f"checkpoint {name!r} {list(real.shape)}")
            if isinstance(where, int):
                args[where] = real
            else:
                kwargs[where] = real
        return tuple(args), kwargs

    def module(self, backend: str = "reference") -> torch.nn.Module:
        from .layers import MTP, DecoderLayer

        if self.prefix.startswith("mtp."):
            mod = MTP(self.cfg, backend=backend)
        elif self.prefix.startswith("layers."):
            mod = DecoderLayer(self.cfg, self.layer_idx, backend=backend)
        else:
            raise ValueError("module: the top level is not one module (use Model and load_into(model, path, 'top'))")
        return load_into(mod, self.path, self.prefix.rstrip("."))


def layer_inputs_from(path: str | os.PathLike, layer: int | str, *, cfg: DSv4Config | None = None,
                      experts: Iterable[int] | None = None, dtype: torch.dtype = torch.bfloat16) -> LayerWeights:
    """One checkpoint layer, dequantised, for notebooks and ``dsv4lab compare --checkpoint PATH --layer N``."""
    ck = Checkpoint.open(path)
    cfg = cfg or ck.config()
    tensors = load_layer(ck, layer, dequantize=True, dtype=dtype, cfg=cfg, experts=experts)
    return LayerWeights(cfg, layer_prefix(layer, cfg), tensors, os.fspath(path))


# ---- synthetic checkpoints (tests, demos) --------------------------------------------------------------
def synthetic_tensors(cfg: DSv4Config, *, seed: int = 0, groups: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of ``cfg`` in the stored formats (full checkpoint names): fp8 e4m3 +
    UE8M0 128x128 scales (``float8_e8m0fnu``), packed e2m1 int8 + UE8M0 1x32 scales, bf16, fp32, int64.

    Magnitudes: linear weights N(0, 1/in) before quantisation, norms 1 + N(0, 0.05^2), fp32 vectors N(0, 0.5^2),
    fp32 matrices N(0, 0.25/in). ``groups``: subset of ``"top"``, ``"layers.N"``, ``"mtp.K"`` (default all)."""
    if not HAS_E8M0_DTYPE:
        raise RuntimeError("synthetic_tensors needs torch.float8_e8m0fnu (torch >= 2.7) to write F8_E8M0")
    g = torch.Generator().manual_seed(seed)
    all_groups = ["top"] + [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + \
                 [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]
    out: dict[str, torch.Tensor] = {}
    for group in groups or all_groups:
        prefix = "" if group == "top" else group + "."
        specs = expected_tensors(cfg, prefix)
        for name, spec in specs.items():
            full, shape = prefix + name, tuple(spec.shape)
            if spec.dtype == "e8m0":
                continue                                   # written with its weight
            if spec.dtype == "int64":
                out[full] = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g).topk(
                    cfg.num_experts_per_tok, dim=-1).indices.to(torch.int64)
            elif spec.dtype in ("fp8", "fp4x2"):
                sname = name[: -len(".weight")] + ".scale"
                rows, cols = shape[0], shape[1] * (2 if spec.dtype == "fp4x2" else 1)
                if spec.dtype == "fp4x2":
                    m = _EXPERT.match(name)
                    if m.group(1) != "0":
                        continue                           # drawn with expert 0: one quantisation call per matrix
                    n_e = cfg.n_routed_experts
                    q, s = quant_fp4(torch.randn(n_e, rows, cols, generator=g) * cols ** -0.5, FP4_BLOCK)
                    rest = m.group(2)[: -len(".weight")]
                    for e in range(n_e):    # clones: safetensors refuses tensors that share storage
                        out[f"{prefix}ffn.experts.{e}.{rest}.weight"] = q[e].clone().view(torch.int8)
                        out[f"{prefix}ffn.experts.{e}.{rest}.scale"] = s[e].clone().view(torch.float8_e8m0fnu)
                else:
                    x = torch.randn(rows, cols, generator=g) * cols ** -0.5
                    br, bc = FP8_BLOCK
                    pr, pc = -(-rows // br) * br, -(-cols // bc) * bc       # zero padding leaves block amax unchanged
                    q, s = quant_fp8(torch.nn.functional.pad(x, (0, pc - cols, 0, pr - rows)), FP8_BLOCK)
                    out[full] = q[:rows, :cols].contiguous()
                    out[prefix + sname] = float_to_ue8m0(s).view(torch.float8_e8m0fnu)
            elif spec.dtype == "bf16":
                z = torch.randn(shape, generator=g)
                out[full] = (1 + 0.05 * z if len(shape) == 1 else z * shape[-1] ** -0.5).to(torch.bfloat16)
            else:
                z = torch.randn(shape, generator=g)
                out[full] = 0.5 * z if len(shape) == 1 else z * 0.5 * shape[-1] ** -0.5
    return out


def write_checkpoint(path: str | os.PathLike, cfg: DSv4Config, tensors: dict[str, torch.Tensor], *,
                     shards: int = 1) -> list[str]:
    """Write ``tensors`` (full names, stored formats) plus ``config.json`` into directory ``path``:
    ``shards == 1`` -> ``model.safetensors``; otherwise HF-style ``model-0000i-of-0000n.safetensors`` + index,
    tensors dealt round-robin in name order (so a layer spans every shard). Returns the shard paths."""
    from safetensors.torch import save_file

    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: expected a positive int, got {shards!r}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=1)
    names = sorted(tensors)
    if shards == 1:
        file = os.path.join(path, "model.safetensors")
        save_file({n: tensors[n].contiguous() for n in names}, file, metadata={"format": "pt"})
        return [file]
    files, weight_map = [], {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, os.path.join(path, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
        files.append(os.path.join(path, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return files
