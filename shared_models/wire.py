"""How a message's arrays travel: every ArrayRecord of many arrays as one packed array.

Flower 1.41 moves a message as content-addressed objects, one per array and one per array chunk, and
a SuperNode pulls each object from the SuperLink with its own authenticated HTTP request (each also
costs the SuperLink a few database queries). The model has 89 tensors, so every message carrying it
(training, evaluation, delivery) and every masked update coming back cost ~180 requests per site:
most of the SuperLink's CPU in a deployment and most of a round's wall time on a small machine.
Packed, a model is one array (one or a few 5 MB chunks).

The packing is exact: each Array's serialized bytes, dtype, shape and stype are kept, so the unpacked
content is byte-identical to what was packed (SecAgg+'s masked integers included). Both sides pack what
they send and unpack what they receive (the server in `server.workflow.PollingGrid`, the site in
`client.app`'s outermost mod); content that is not packed passes through, so a peer that does not pack
still interoperates.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED_KEY = "packed"  # the one array of a packed ArrayRecord
LAYOUT_SUFFIX = ".oncofed-layout"  # ConfigRecord beside it: [[key, dtype, shape, stype, nbytes], ...]


def pack(content: RecordDict) -> RecordDict:
    """`content` with every ArrayRecord of two or more arrays replaced by one array of their bytes."""
    if not any(isinstance(r, ArrayRecord) and len(r) > 1 for r in content.values()):
        return content
    out = RecordDict()
    for name, record in content.items():
        if not (isinstance(record, ArrayRecord) and len(record) > 1):
            out[name] = record
            continue
        layout, chunks = [], []
        for key, array in record.items():
            layout.append([key, array.dtype, list(array.shape), array.stype, len(array.data)])
            chunks.append(array.data)
        out[name] = ArrayRecord({PACKED_KEY: Array(np.frombuffer(b"".join(chunks), dtype=np.uint8))})
        out[name + LAYOUT_SUFFIX] = ConfigRecord({"layout": json.dumps(layout)})
    return out


def is_packed(content: RecordDict) -> bool:
    return any(name.endswith(LAYOUT_SUFFIX) for name in content.keys())


def unpack(content: RecordDict) -> RecordDict:
    """The inverse of `pack`; content that is not packed is returned as it is."""
    if not is_packed(content):
        return content
    out = RecordDict()
    for name, record in content.items():
        if name.endswith(LAYOUT_SUFFIX):
            continue
        layout_record = content.get(name + LAYOUT_SUFFIX)
        if layout_record is None or not isinstance(record, ArrayRecord):
            out[name] = record
            continue
        raw = record[PACKED_KEY].numpy().tobytes()
        arrays, at = {}, 0
        for key, dtype, shape, stype, nbytes in json.loads(str(layout_record["layout"])):
            arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=raw[at:at + nbytes])
            at += nbytes
        if at != len(raw):
            raise ValueError(f"packed array record {name!r}: {len(raw)} bytes, its layout accounts for {at}")
        out[name] = ArrayRecord(arrays)
    return out
