"""Arrays on the wire: {"shape": [..], "dtype": "float32", "data": base64 of little-endian float32 bytes}.

A browser turns such a payload into numbers with one `Float32Array` over the decoded bytes,
where the same numbers printed as JSON text would take longer to write, send and parse than
the whole forward pass. Float32 keeps -inf (a masked attention score) and NaN, which JSON
text cannot carry.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np
import torch

from binarylm.errors import BinaryLMError

WIRE_DTYPE = np.dtype("<f4")  # little-endian float32, whatever the machine's byte order


def encode_array(array: torch.Tensor | np.ndarray) -> dict:
    """A tensor or array of any float or integer dtype as the wire's float32 Array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to(device="cpu", dtype=torch.float32).numpy()
    values = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return {"shape": list(values.shape), "dtype": "float32", "data": base64.b64encode(values.tobytes()).decode()}


def decode_array(payload: dict) -> np.ndarray:
    """The float32 NumPy array an encoded Array holds (a writable copy, in the shape it names)."""
    if not isinstance(payload, dict) or not {"shape", "dtype", "data"} <= payload.keys():
        raise BinaryLMError("an encoded array is a dict with 'shape', 'dtype' and 'data'; got something else")
    if payload["dtype"] != "float32":
        raise BinaryLMError(f"encoded arrays hold float32, not {payload['dtype']!r}")
    try:
        raw = base64.b64decode(payload["data"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise BinaryLMError("an encoded array's 'data' is not valid base64") from None
    values = np.frombuffer(raw, dtype=WIRE_DTYPE)
    shape = [int(size) for size in payload["shape"]]
    if values.size != math.prod(shape):
        raise BinaryLMError(f"an encoded array of shape {shape} needs {math.prod(shape)} numbers; "
                            f"its data holds {values.size}")
    return values.reshape(shape).astype(np.float32)
