"""Wire format of the sampling service, shared by the ``remote`` client and the server.

It lives next to the client (``samplers/``) so that the service package depends on the
samplers and never the other way round.

``POST /v1/sample`` takes a JSON object ``{"h": ARRAY, "W": ARRAY, "num_reads": int,
"n_visible": int | null}`` and answers ``{"samples": BITS, "info": {...}}``. An ``ARRAY`` is
either a (nested) JSON list of numbers, convenient from ``curl``, or
``{"dtype": "float32" | "float64", "shape": [...], "data": base64}`` with the little-endian
bytes, which the client sends because a 1024-unit ``W`` as JSON text is ~20 MB. ``BITS`` is
``{"shape": [num_reads, n], "data": base64}`` of the samples packed eight per byte (numpy's
``packbits``, big-endian bit order). Errors are ``{"error": {"code": str, "message": str}}``
with a 4xx or 5xx status.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np

API_PREFIX = "/v1"
#: Environment variable with the shared token, read by the server and the client.
TOKEN_ENV = "SCQBM_SAMPLER_TOKEN"
_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


class ProtocolError(ValueError):
    """A request or response that does not follow the wire format."""


def encode_array(array, dtype: str = "float32") -> dict:
    """An array as ``{"dtype", "shape", "data"}`` with base64 little-endian bytes."""
    if dtype not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    values = np.ascontiguousarray(np.asarray(array, dtype=_DTYPES[dtype]))
    return {
        "dtype": dtype,
        "shape": list(values.shape),
        "data": base64.b64encode(values.tobytes()).decode("ascii"),
    }


def decode_array(value, name: str) -> np.ndarray:
    """Decode an ``ARRAY`` (encoded object or nested list) to float64; ``ProtocolError`` if bad."""
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise ProtocolError(
                f"`{name}` must be a rectangular list of numbers or an encoded array."
            ) from None
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError(
            f"`{name}` must be a list of numbers or an object with exactly the keys 'dtype', "
            "'shape' and 'data'."
        )
    dtype = _DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise ProtocolError(f"`{name}.dtype` must be one of {sorted(_DTYPES)}.")
    shape = value["shape"]
    if not (isinstance(shape, list) and len(shape) <= 2 and all(_is_count(d) for d in shape)):
        raise ProtocolError(f"`{name}.shape` must be a list of at most 2 non-negative integers.")
    if not isinstance(value["data"], str):
        raise ProtocolError(f"`{name}.data` must be a base64 string.")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"`{name}.data` is not valid base64.") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"`{name}.data` has {len(raw)} bytes; shape {shape} of {value['dtype']} needs "
            f"{expected}."
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float64)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_bits(samples) -> dict:
    """0/1 samples ``(k, n)`` packed eight per byte."""
    samples = np.asarray(samples)
    packed = np.packbits(samples.astype(bool), axis=-1)
    return {"shape": list(samples.shape), "data": base64.b64encode(packed.tobytes()).decode()}


def decode_bits(value, shape: tuple[int, int]) -> np.ndarray:
    """Unpack ``encode_bits`` output of the expected ``shape`` to a float64 array of 0/1.

    Strict: the declared shape must be two integers equal to ``shape``, the data valid
    base64 of exactly ``rows * ceil(cols / 8)`` bytes, and the padding bits of each row zero.
    Anything else raises :class:`ProtocolError`.
    """
    if not isinstance(value, dict) or set(value) != {"shape", "data"}:
        raise ProtocolError("`samples` must be an object with exactly the keys 'shape', 'data'.")
    declared = value["shape"]
    if not (isinstance(declared, list) and len(declared) == 2 and all(map(_is_count, declared))):
        raise ProtocolError(f"`samples.shape` must be two non-negative integers: {declared!r}.")
    if tuple(declared) != tuple(shape):
        raise ProtocolError(f"`samples.shape` is {declared}; {list(shape)} were asked for.")
    if not isinstance(value["data"], str):
        raise ProtocolError("`samples.data` must be a base64 string.")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("`samples.data` is not valid base64.") from None
    rows, cols = shape
    row_bytes = -(-cols // 8)
    if len(raw) != rows * row_bytes:
        raise ProtocolError(
            f"`samples.data` has {len(raw)} bytes; shape {list(shape)} needs {rows * row_bytes}."
        )
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(rows, row_bytes)
    bits = np.unpackbits(packed, axis=-1)
    if bits[:, cols:].any():
        raise ProtocolError("`samples.data` has bits set beyond the last unit of a row.")
    return bits[:, :cols].astype(np.float64)
