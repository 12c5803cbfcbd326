"""SecAgg+'s masks from the whole seed.

Flower 1.41 (`flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`) folds each mask seed (a
site's 32-byte self-mask seed, a pair of sites' shared key) into 32 bits by XOR and seeds numpy's Mersenne
Twister with them. A server that unmasks a sum of two sites learns one site's self-mask (it must, to
unmask) and is left with that site's vector under one pairwise mask of 2^32 possible seeds: trying them all,
the right seed is the one that leaves every coordinate in the quantisation range, and the site's own update
comes out (`benchmarks/secagg_mask_search.py` recovers it exactly: 2^18 seeds around the true one in 27 s of
Python, so 2^32 in ~120 CPU-hours of Python and far less in C). With it, a sum of two is no aggregate.

Here a mask is the AES-256-CTR keystream (the `cryptography` package) under SHA-256 of the whole seed, read as
little-endian 64-bit words reduced modulo the range (a power of two in OncoFed's SecAgg+: uniform exactly).
`install()` puts it in place of Flower's function in both SecAgg+ modules: the sites' mod (masking) and the
server's workflow (unmasking), which must agree; `client.app` and `server.app` call it when imported, so
every OncoFed process, simulated or deployed (the SuperNodes run the app the SuperLink ships), uses it. Flower's
own masks also never took the value range - 1 (`randint(0, num_range - 1)` excludes its upper bound); these do.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

VERSION = "aes256-ctr-sha256-v1"  # sent with every training request (shared_models.protocol.SECAGG_MASKS)
DOMAIN = b"oncofed secagg+ mask v1\x00"  # the key is SHA-256(DOMAIN + seed): no other use of a seed shares it


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Flower's signature: for each shape in `dimensions_list`, an int64 array (a 0-d one for `()`) of values
    in [0, num_range), from the keystream of the whole `seed`."""
    if not 1 < num_range <= 2 ** 62:
        raise ValueError(f"SecAgg+ mask range {num_range} outside (1, 2^62]")
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    key = hashlib.sha256(DOMAIN + bytes(seed)).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * sum(sizes)))
    values = (np.frombuffer(stream, dtype="<u8") % np.uint64(num_range)).astype(np.int64)
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        chunk = values[start:start + size]
        start += size
        out.append(np.array(chunk[0], dtype=np.int64) if len(shape) == 0 else chunk.reshape(shape))
    return out


# the modules themselves (their package re-exports the mod's function under the module's name)
MODULES = ("flwr.client.mod.secure_aggregation.secaggplus_mod",
           "flwr.server.workflow.secure_aggregation.secaggplus_workflow")


def install() -> None:
    """Flower's SecAgg+ (the sites' mod and the server's workflow) draws its masks with `pseudo_rand_gen`."""
    import importlib

    for name in MODULES:
        module = importlib.import_module(name)
        if not callable(getattr(module, "pseudo_rand_gen", None)):
            raise ImportError(f"{name} has no pseudo_rand_gen: this Flower is not the 1.41 the masks were fitted to")
        module.pseudo_rand_gen = pseudo_rand_gen


def installed() -> bool:
    import importlib

    return all(importlib.import_module(name).pseudo_rand_gen is pseudo_rand_gen for name in MODULES)
