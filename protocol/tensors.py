"""Torch-free tensor values and their byte layouts: store blobs and multipart message frames.

A ``RawTensor`` is a dtype name, a shape and little-endian C-order bytes. Tensors never travel inside
msgpack maps (msgpack would copy them and bound nothing useful); instead:

- a **blob** (the store's self-describing value) is ``pack_header(dtype, shape) + raw bytes``, where
  the header is a 4-byte little-endian length followed by a canonical msgpack map
  ``{"dtype": str, "shape": [int, ...]}``. ``blob_key`` hashes exactly those bytes, so identical
  dtype + shape + bytes always give the identical content address, and decoders insist on the
  canonical header so one tensor can never have two addresses.
- a **frame list** (for ZeroMQ multipart messages off the peer bus, such as a store service's
  replies) is one msgpack index frame naming every tensor
  with its dtype and shape, then one raw frame per tensor, sent without copying.

Everything read from outside is validated and bounded; failures raise ``ProtocolError``.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from protocol.messages import PROTOCOL_VERSION, ProtocolError

__all__ = [
    "DTYPES",
    "MAX_RANK",
    "ProtocolError",
    "RawTensor",
    "blob_key",
    "decode_blob",
    "encode_blob",
    "frame_tensors",
    "itemsize",
    "pack_header",
    "unframe_tensors",
    "unpack_header",
]

# dtype name -> (bytes per element, little-endian numpy dtype or None where numpy has none)
DTYPES: dict[str, tuple[int, str | None]] = {
    "float32": (4, "<f4"),
    "float16": (2, "<f2"),
    "bfloat16": (2, None),
    "float64": (8, "<f8"),
    "int64": (8, "<i8"),
    "int32": (4, "<i4"),
    "int16": (2, "<i2"),
    "int8": (1, "i1"),
    "uint8": (1, "u1"),
    "bool": (1, "?"),
}
MAX_RANK = 8
MAX_DIM = 2**40  # per dimension; far above any real tensor, low enough that products stay sane
MAX_TENSOR_BYTES = 2**40
MAX_HEADER_BYTES = 256  # a rank-8 header with huge dims is < 100 bytes
MAX_TENSORS_PER_FRAMESET = 4096
MAX_TENSOR_NAME_LEN = 256
_LENGTH = struct.Struct("<I")
_NUMPY_TO_NAME = {np.dtype(np_name): name for name, (_, np_name) in DTYPES.items() if np_name}

Buffer = bytes | bytearray | memoryview


def itemsize(dtype: str) -> int:
    """Bytes per element of a supported dtype name; ProtocolError for an unknown one."""
    try:
        return DTYPES[dtype][0]
    except (KeyError, TypeError):
        raise ProtocolError(f"unsupported tensor dtype {str(dtype)[:32]!r}") from None


def _checked_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)):
        raise ProtocolError(f"tensor shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise ProtocolError(f"tensor rank {len(shape)} exceeds {MAX_RANK}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(f"tensor dimension {dim!r} is not an int in [0, {MAX_DIM}]")
    return tuple(shape)


def _byte_view(buf: Any) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer; ProtocolError for anything else."""
    try:
        view = memoryview(buf)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise ProtocolError(f"expected a contiguous bytes-like object, got {type(buf).__name__}") from None


def _as_bytes_view(data: Any) -> bytes | bytearray | memoryview:
    """Accept bytes/bytearray as they are; flatten a memoryview to 1-D unsigned bytes without copying."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        if data.format == "B" and data.ndim == 1:
            return data
        if not data.c_contiguous:
            raise ProtocolError("tensor data memoryview must be C-contiguous")
        return data.cast("B")
    raise ProtocolError(f"tensor data must be bytes, bytearray or memoryview, got {type(data).__name__}")


@dataclass(frozen=True)
class RawTensor:
    """A tensor as plain bytes: dtype name, shape, little-endian C-order data (validated on creation).

    ``data`` may be a memoryview into a larger buffer (zero-copy decode); it stays valid only as long
    as that buffer does, so copy it (``bytes(t.data)``) before the buffer goes away.
    """

    dtype: str
    shape: tuple[int, ...]
    data: Buffer

    def __post_init__(self) -> None:
        size = itemsize(self.dtype)
        shape = _checked_shape(self.shape)
        data = _as_bytes_view(self.data)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", data)
        expected = math.prod(shape) * size
        if expected > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}")
        if len(data) != expected:
            raise ProtocolError(
                f"tensor data has {len(data)} bytes, {self.dtype}{list(shape)} needs {expected}"
            )

    def __repr__(self) -> str:  # never dump megabytes of data into a log line
        return f"RawTensor({self.dtype}{list(self.shape)}, {len(self.data)} bytes)"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_numpy(cls, array: Any) -> RawTensor:
        """Copy a numpy array (any byte order or layout) into a little-endian C-order RawTensor."""
        arr = np.asarray(array)
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes' bfloat16
            data = np.ascontiguousarray(arr).tobytes()
            return cls("bfloat16", tuple(int(d) for d in arr.shape), data)
        name = _NUMPY_TO_NAME.get(arr.dtype.newbyteorder("<"))
        if name is None:
            raise ProtocolError(f"unsupported numpy dtype {arr.dtype}; use one of {sorted(DTYPES)}")
        little = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
        return cls(name, tuple(int(d) for d in arr.shape), little.tobytes(order="C"))

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the bytes (no copy; read-only when ``data`` is immutable bytes)."""
        np_dtype = DTYPES[self.dtype][1]
        if np_dtype is None:
            raise ProtocolError(
                f"{self.dtype} has no numpy dtype; read RawTensor.data directly "
                "(e.g. torch.frombuffer(data, dtype=torch.bfloat16).reshape(shape))"
            )
        return np.frombuffer(self.data, dtype=np_dtype).reshape(self.shape)


def pack_header(dtype: str, shape: Sequence[int]) -> bytes:
    """The canonical header for a tensor: 4-byte LE length + msgpack {"dtype", "shape"}."""
    itemsize(dtype)
    shape = _checked_shape(tuple(shape))
    body = msgpack.packb({"dtype": dtype, "shape": list(shape)}, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def unpack_header(buf: Buffer) -> tuple[str, tuple[int, ...], int]:
    """Parse a header at the start of ``buf``: (dtype, shape, header length in bytes).

    Only the canonical encoding is accepted, so re-packing the result gives the same bytes.
    """
    view = _byte_view(buf)
    if view.nbytes < _LENGTH.size:
        raise ProtocolError("tensor header truncated: no length prefix")
    (body_len,) = _LENGTH.unpack_from(view, 0)
    if body_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"tensor header length {body_len} exceeds {MAX_HEADER_BYTES}")
    header_len = _LENGTH.size + body_len
    if view.nbytes < header_len:
        raise ProtocolError("tensor header truncated")
    try:
        body = msgpack.unpackb(
            view[_LENGTH.size:header_len],
            raw=False,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=0,
            max_array_len=MAX_RANK,
            max_map_len=2,
            max_ext_len=0,
        )
    except Exception as exc:  # any msgpack failure on junk means the same thing
        raise ProtocolError(f"tensor header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict) or set(body) != {"dtype", "shape"}:
        raise ProtocolError("tensor header must be a map with exactly 'dtype' and 'shape'")
    dtype, shape = body["dtype"], body["shape"]
    if type(dtype) is not str:
        raise ProtocolError("tensor header dtype must be a string")
    shape = _checked_shape(shape)
    if pack_header(dtype, shape) != view[:header_len]:
        raise ProtocolError("tensor header is not in canonical form")
    return dtype, shape, header_len


def encode_blob(tensor: RawTensor) -> bytes:
    """The store's self-describing value for a tensor: header followed by the raw bytes."""
    return pack_header(tensor.dtype, tensor.shape) + tensor.data


def decode_blob(buf: Buffer) -> RawTensor:
    """Parse a blob without copying: the result's ``data`` is a memoryview slice of ``buf``."""
    view = _byte_view(buf)
    dtype, shape, header_len = unpack_header(view)
    return RawTensor(dtype, shape, view[header_len:])


def blob_key(tensor: RawTensor) -> str:
    """Content address: hex blake2b-256 of header + bytes (equal for equal dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(pack_header(tensor.dtype, tensor.shape))
    digest.update(tensor.data)
    return digest.hexdigest()


def frame_tensors(tensors: Mapping[str, RawTensor]) -> list[Buffer]:
    """Frames for a ZeroMQ multipart message: a msgpack index, then each tensor's bytes (not copied)."""
    if len(tensors) > MAX_TENSORS_PER_FRAMESET:
        raise ProtocolError(f"more than {MAX_TENSORS_PER_FRAMESET} tensors in one message")
    index = []
    for name, tensor in tensors.items():
        _check_tensor_name(name)
        if not isinstance(tensor, RawTensor):
            raise ProtocolError(f"tensor {name!r} is a {type(tensor).__name__}, not a RawTensor")
        index.append([name, tensor.dtype, list(tensor.shape)])
    header = msgpack.packb({"v": PROTOCOL_VERSION, "tensors": index}, use_bin_type=True)
    return [header, *(tensor.data for tensor in tensors.values())]


def _check_tensor_name(name: Any) -> None:
    if type(name) is not str or not 0 < len(name) <= MAX_TENSOR_NAME_LEN:
        raise ProtocolError(f"tensor name must be a non-empty str of at most {MAX_TENSOR_NAME_LEN} chars")


def unframe_tensors(frames: Sequence[Buffer]) -> dict[str, RawTensor]:
    """Inverse of ``frame_tensors``; tensor data are views of the given frames (no copies)."""
    if len(frames) < 1:
        raise ProtocolError("tensor frames are missing their index frame")
    try:
        index = msgpack.unpackb(
            frames[0],
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_TENSOR_NAME_LEN * 4,
            max_bin_len=0,
            max_array_len=MAX_TENSORS_PER_FRAMESET,
            max_map_len=2,
            max_ext_len=0,
        )
    except Exception as exc:  # any msgpack failure on junk means the same thing
        raise ProtocolError(f"tensor index is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(index, dict) or set(index) != {"v", "tensors"}:
        raise ProtocolError("tensor index must be a map with exactly 'v' and 'tensors'")
    if type(index["v"]) is not int or index["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"tensor index version {index['v']!r} is not {PROTOCOL_VERSION}")
    entries = index["tensors"]
    if not isinstance(entries, list):
        raise ProtocolError("tensor index 'tensors' must be a list")
    if len(frames) != 1 + len(entries):
        raise ProtocolError(f"tensor index lists {len(entries)} tensors but {len(frames) - 1} frames follow")
    tensors: dict[str, RawTensor] = {}
    for entry, frame in zip(entries, frames[1:]):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ProtocolError("tensor index entry must be [name, dtype, shape]")
        name, dtype, shape = entry
        _check_tensor_name(name)
        if name in tensors:
            raise ProtocolError(f"tensor name {name!r} appears twice")
        if type(dtype) is not str:
            raise ProtocolError(f"tensor {name!r}: dtype must be a string")
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"tensor {name!r}: frame is a {type(frame).__name__}, not bytes")
        tensors[name] = RawTensor(dtype, _checked_shape(shape), frame)
    return tensors
