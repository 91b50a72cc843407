"""Frames as .npy bytes in one copy, for the staging object a GPU worker hands to the cpu queue.

`np.save` into an `io.BytesIO` copies a clip three to four times (chunked `tobytes`, the
BytesIO's growth, `getvalue()`): 168 ms for a 512x512x49 clip (38 MB) on an H100 machine's
host on 2026-11-27, by the old replay bench. Here the header is written once
and the pixels are copied once, into a buffer of the final size; the result is byte-for-byte
what `np.save(..., allow_pickle=False)` writes, so `np.load` reads it back unchanged.

Needs numpy only.
"""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(frames: np.ndarray) -> bytearray:
    """The .npy serialisation of `frames` (C order; any dtype without objects), as one bytearray."""
    array = np.ascontiguousarray(frames)  # no copy for what models return
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be staged (they would need pickle)")
    header = io.BytesIO()
    # The header np.save writes for it (format 1.0, padded so the data starts aligned).
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = header.getvalue()
    out = bytearray(len(head) + array.nbytes)
    out[: len(head)] = head
    if array.nbytes:
        np.frombuffer(out, dtype=np.uint8, offset=len(head))[:] = array.reshape(-1).view(np.uint8)
    return out
