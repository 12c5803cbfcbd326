"""The randomness of a site's DP-SGD: which records each step samples (Poisson) and the Gaussian noise.

Both must be secret from everyone outside the site, the server included. DP's guarantee assumes the
adversary cannot predict the noise (whoever can, subtracts it from the aggregate) nor which records a
step sampled (the amplification by subsampling that the accountant counts on assumes a secret sample).
A site seeds torch from the run config (seed, site index, round: client/local_round.py) so that model
initialisation and non-DP runs are reproducible; the server knows those seeds, so the DP draws must not
come from torch's global generator, which is where Opacus takes them from by default (`secure_mode=False`).

Dropout's masks must be secret too (`secret_dropout`): they are drawn for the whole batch from torch's
global generator, so a record's mask depends on its position in the batch, that is on which other records
the step sampled. From a public seed the server could compute every mask, and removing one patient would
change the other sampled patients' (known) gradients: the sensitivity C the accountant assumes would not
hold. With secret, independent masks, the step is a mixture over masks of mechanisms each of sensitivity C
(couple the other records' masks), and the accounting holds: for RDP (distributed mode) by the joint
quasi-convexity of the Renyi divergence, for PRV (site mode) by the joint convexity of the hockey-stick
divergence. The generator is the process's: nothing else may seed it during a DP round.

Opacus' `secure_mode=True` would take them from torchcsprng (/dev/urandom) and draw each noise value
as a sum of four Gaussians (a defence against floating-point attacks on the noise). It is not used:
torchcsprng is unmaintained, has no build for torch 2.x and cannot be installed with this project's
pinned torch; and the floating-point attacks need the individual noisy values, which never leave a
site (the server sees only SecAgg+ sums of several sites' clipped, noised and quantised updates over
many steps). What secure mode gives that matters here, an unpredictable seed, this module gives: a
generator seeded per round from 63 bits of the operating system's CSPRNG (`secrets`), never stored.
docs/hospital-guide.md says the same to the hospitals.
"""

from __future__ import annotations

import secrets
import warnings

import numpy as np
import torch


def dp_numpy_generator() -> np.random.Generator:
    """numpy's generator for a round's distributed-DP draws (randomized rounding, Skellam noise:
    privacy/distributed.py), seeded with 128 bits of the OS CSPRNG, never stored."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def dp_generator() -> torch.Generator:
    """A generator for one round's DP draws, seeded from the OS CSPRNG (unknown to anyone, the site too)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def secret_dropout() -> None:
    """Seed torch's global generator, which dropout and attention dropout draw from, from the OS CSPRNG for
    the rest of a DP round (after the model's initialisation from the run's public seed): see above."""
    torch.manual_seed(secrets.randbits(63))


def private_engine(accountant: str = "prv"):
    """Opacus' PrivacyEngine drawing its Poisson sampling from `engine.secure_rng` = dp_generator(); pass the
    same as `make_private(noise_generator=engine.secure_rng)` for the noise. Opacus' warning that secure
    mode is off is silenced: the reason it exists is answered above."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    # Opacus reads secure_rng only for the data loader's sampler when secure_mode is off (the noise takes
    # make_private's noise_generator): a secret seed without torchcsprng
    engine.secure_rng = dp_generator()
    return engine
