"""A GGUF file's metadata and tensor index, read in one pass over its header.

GGUF (llama.cpp's format, version 2 or 3, little-endian) is: magic ``GGUF``, version
(uint32), tensor count and metadata count (uint64 each), the metadata key/value pairs, one
info record per tensor (name, dims in ggml order, ggml type, offset), padding to
``general.alignment`` (default 32) and the tensor data.

The ``gguf`` package's ``GGUFReader`` builds a numpy view for every element of every
metadata array, which makes a tokenizer's 49,152 tokens and 48,900 merges (SmolLM2) take
about 3 s to parse on a 2-vCPU machine, twice per model load (weights and tokenizer). This
reads strings with ``struct`` and numeric arrays with one ``np.frombuffer`` each, and maps
the tensor data (no copy) in the same layout ``GGUFReader`` gives, so the ``gguf``
package's ``dequantize`` still decodes it. Only tensor data is mapped; nothing is
unpickled.

``read_gguf(path)`` -> ``GGUFFile`` with ``metadata`` ({key: str / int / float / bool /
list}) and ``tensors`` ({name: GGUFTensor}, in file order).
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any, Dict, Tuple

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): struct format of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# ggml types whose data GGUFReader presents as typed elements (the rest as bytes per row).
_PLAIN_TENSORS = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                  27: np.int64, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor of a GGUF file.

  shape: dims in ggml order (fastest-varying first), as stored; the row-major numpy shape
    is ``tuple(reversed(shape))``.
  tensor_type: the ``gguf.GGMLQuantizationType`` (F32, F16, Q4_1, ...).
  data: a read-only map of the stored bytes: typed [*reversed(shape)] for F32 / F16 / F64 /
    I8..I64, else uint8 [*reversed(shape)[:-1], bytes per row] (``gguf.quants.dequantize``
    decodes either).
  """
  name: str
  shape: Tuple[int, ...]
  tensor_type: Any
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """path, version, metadata {key: value} and tensors {name: GGUFTensor} of a GGUF file."""
  path: str
  version: int
  metadata: Dict[str, Any]
  tensors: Dict[str, GGUFTensor]


class _Header:
  """Reads values from ``buf`` at a moving offset; errors name the file."""

  def __init__(self, path: str, buf):
    self.path, self.buf, self.pos = path, buf, 0

  def need(self, n: int, what: str) -> None:
    if n < 0 or self.pos + n > len(self.buf):
      raise ValueError(f"{self.path}: GGUF file ends inside {what} (byte {self.pos} of "
                       f"{len(self.buf)}); the file is truncated or not GGUF")

  def scalar(self, fmt: str, what: str):
    size = struct.calcsize(fmt)
    self.need(size, what)
    value = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += size
    return value

  def string(self, what: str) -> str:
    n = self.scalar("<Q", what)
    self.need(n, what)
    raw = bytes(self.buf[self.pos:self.pos + n])
    self.pos += n
    return raw.decode("utf-8", errors="replace")

  def value(self, kind: int, key: str) -> Any:
    if kind == _STRING:
      return self.string(f"metadata {key!r}")
    if kind in _SCALARS:
      return self.scalar(_SCALARS[kind], f"metadata {key!r}")
    if kind != _ARRAY:
      raise ValueError(f"{self.path}: metadata {key!r} has unknown GGUF value type {kind}")
    item, count = self.scalar("<I", f"metadata {key!r}"), self.scalar("<Q", f"metadata {key!r}")
    if item in _NUMPY:
      dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
      self.need(count * dtype.itemsize, f"metadata {key!r}")
      values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
      self.pos += count * dtype.itemsize
      return values
    return [self.value(item, key) for _ in range(count)]


def read_gguf(path: str) -> GGUFFile:
  """Reads a GGUF file's metadata and tensor index; the tensor data stays on disk (mapped).

  Raises ValueError naming the file for: no GGUF magic, an unsupported version or byte
  order, a truncated header, an unknown value type or ggml type, a repeated key or tensor
  name, a bad alignment, rows that do not fill whole quantization blocks, or tensor data past
  the end of the file.
  """
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
  from gguf.quants import quant_shape_to_byte_shape
  with open(path, "rb") as f:
    if f.read(4) != MAGIC:
      raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:   # an empty file cannot be mapped
      raise ValueError(f"{path}: GGUF file is truncated ({e})") from None
  try:
    h = _Header(path, buf)
    h.pos = 4
    version = h.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
      swapped = struct.unpack(">I", struct.pack("<I", version))[0]
      if swapped in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
      raise ValueError(f"{path}: GGUF version {version} is not supported "
                       f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = h.scalar("<Q", "the tensor count"), h.scalar("<Q", "the metadata count")
    metadata: Dict[str, Any] = {}
    for _ in range(n_kv):
      key = h.string("a metadata key")
      if key in metadata:
        raise ValueError(f"{path}: metadata key {key!r} appears twice")
      metadata[key] = h.value(h.scalar("<I", f"metadata {key!r}"), key)
    infos = []
    for _ in range(n_tensors):
      name = h.string("a tensor name")
      n_dims = h.scalar("<I", f"tensor {name!r}")
      dims = tuple(h.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims))
      infos.append((name, dims, h.scalar("<I", f"tensor {name!r}"), h.scalar("<Q", f"tensor {name!r}")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
      raise ValueError(f"{path}: general.alignment = {alignment!r} is not a power of two")
    start = -(-h.pos // alignment) * alignment
    size = len(buf)
  finally:
    buf.close()

  data = np.memmap(path, mode="r") if infos else np.zeros(0, np.uint8)
  tensors: Dict[str, GGUFTensor] = {}
  for name, dims, raw_type, offset in infos:
    if name in tensors:
      raise ValueError(f"{path}: tensor {name!r} appears twice")
    try:
      kind = GGMLQuantizationType(raw_type)
      block, type_size = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
      raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
    n_elements = 1
    for d in dims:
      n_elements *= d
    if dims and dims[0] % block:
      raise ValueError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple "
                       f"of its {kind.name} block size {block}")
    n_bytes = n_elements * type_size // block
    begin = start + offset
    if begin + n_bytes > size:
      raise ValueError(f"{path}: tensor {name!r} ({n_bytes} bytes at byte {begin}) runs past "
                       f"the end of the file ({size} bytes); the file is truncated")
    np_shape = tuple(reversed(dims))
    if raw_type in _PLAIN_TENSORS:
      view = data[begin:begin + n_bytes].view(_PLAIN_TENSORS[raw_type]).reshape(np_shape)
    else:
      view = data[begin:begin + n_bytes].reshape(quant_shape_to_byte_shape(np_shape, kind))
    tensors[name] = GGUFTensor(name, dims, kind, view)
  return GGUFFile(path, version, metadata, tensors)
