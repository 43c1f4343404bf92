"""Wire format of the sampling service, shared by the server and the ``remote`` client.

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
        except (TypeError, ValueError):
            raise ProtocolError(
                f"`{name}` must be a rectangular list of numbers or an encoded array."
            ) from None
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError(
            f"`{name}` must be a list of numbers or an object with exactly the keys 'dtype', "
            "'shape' and 'data'."
        )
    dtype = _DTYPES.get(value["dtype"])
    if dtype is None:
        raise ProtocolError(f"`{name}.dtype` must be one of {sorted(_DTYPES)}.")
    shape = value["shape"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ProtocolError(f"`{name}.shape` must be a list of non-negative integers.")
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


def encode_bits(samples) -> dict:
    """0/1 samples ``(k, n)`` packed eight per byte."""
    samples = np.asarray(samples)
    packed = np.packbits(samples.astype(bool), axis=-1)
    return {"shape": list(samples.shape), "data": base64.b64encode(packed.tobytes()).decode()}


def decode_bits(value) -> np.ndarray:
    """Unpack ``encode_bits`` output to a float64 array of 0/1 values."""
    try:
        rows, cols = (int(d) for d in value["shape"])
        packed = np.frombuffer(base64.b64decode(value["data"], validate=True), dtype=np.uint8)
        bits = np.unpackbits(packed.reshape(rows, -1), axis=-1, count=cols)
    except (KeyError, TypeError, ValueError, binascii.Error) as err:
        raise ProtocolError(f"Malformed samples in the service's answer: {err}") from None
    return bits.astype(np.float64)
