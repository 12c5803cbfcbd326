"""Why OncoFed draws SecAgg+'s masks from the whole seed (privacy/secagg_masks.py): with Flower 1.41's own masks a
server that unmasks a sum of two sites can search one pairwise mask's 2^32 seeds for a site's vector.

Two sites A and B, a distributed-DP share of A on OncoFed's SecAgg+ grid (privacy/distributed.py), A and B's real
key agreement (Flower's). After the legitimate unmasking the server holds A's masked vector less A's self-mask:
A's quantised values plus the pairwise mask A-B, modulo 2^32. The search tries 32-bit seeds of numpy's Mersenne
Twister (what Flower's `pseudo_rand_gen` folds the 32-byte shared key into): a wrong seed leaves each of the first
16 coordinates inside the quantisation range with probability 1/4, the right one leaves all of them. It searches
a window of 2^18 seeds around the true fold (the whole 2^32 takes 2^14 times as long), once against Flower's masks
and once against OncoFed's, whose masks no 32-bit seed produces.

    python benchmarks/secagg_mask_search.py [--window-bits 18] [--dim 5000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window-bits", type=int, default=18)
    ap.add_argument("--dim", type=int, default=5000)
    args = ap.parse_args()
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    from privacy.distributed import SecAggGrid, _with, encode, plan, to_flower
    from privacy.dp_randomness import dp_numpy_generator
    from privacy.secagg_masks import pseudo_rand_gen as oncofed_masks

    modulus, d = 2 ** 32, args.dim
    grid = SecAggGrid(1.0, 2 ** 30, modulus, 2000.0)  # 2 sites, as server/app.py sizes the grid
    share = _with(plan(0.1, d, 2, 0.3), 4.38e8)  # a site's share of the distributed run's aggregate noise
    z = encode(np.random.default_rng(1).normal(0, 0.01, d), share, grid, dp_numpy_generator())
    q = quantize(to_flower(z, grid, [(d,)]), grid.clipping_range, grid.quantization_range)[0].astype(np.int64)
    sk_a, _ = generate_key_pairs()
    _, pk_b = generate_key_pairs()
    key = generate_shared_key(sk_a, pk_b)
    fold = 0
    for i in range(0, len(key), 4):
        fold ^= int.from_bytes(key[i:i + 4], "little")
    width = grid.quantization_range
    lo = max(0, fold - 2 ** (args.window_bits - 1))
    print(f"shared key {len(key)} bytes; Flower folds it into the 32-bit seed {fold}; searching seeds "
          f"{lo}..{lo + 2 ** args.window_bits - 1}")
    print("| masks | seeds searched | seeds that fit | A's vector recovered | seconds | the whole 2^32 at this speed |")
    print("|---|---|---|---|---|---|")
    for name, masks in (("Flower 1.41", flower_masks), ("OncoFed (privacy/secagg_masks.py)", oncofed_masks)):
        held = (q + masks(key, modulus, [(d,)])[0]) % modulus  # A's masked vector less its self-mask
        head = held[:16]
        t = time.perf_counter()
        hits = [s for s in range(lo, lo + 2 ** args.window_bits)
                if np.all((head - np.random.RandomState(s).randint(0, modulus - 1, 16, dtype=np.int64)) % modulus
                          <= width)]
        seconds = time.perf_counter() - t
        recovered = False
        for s in hits:
            guess = ((held - np.random.RandomState(s).randint(0, modulus - 1, d, dtype=np.int64)) % modulus)
            recovered |= bool(np.array_equal(guess - width // 2, z))
        print(f"| {name} | 2^{args.window_bits} | {len(hits)} | {'yes' if recovered else 'no'} | {seconds:.1f} | "
              f"{seconds * 2 ** (32 - args.window_bits) / 3600:.0f} CPU-hours (Python) |")


if __name__ == "__main__":
    main()
