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
many steps). What secure mode gives that matters here, an unpredictable generator, this module gives: per
round, a torch generator whose whole MT19937 state (624 words of 32 bits) is drawn from the operating system's
CSPRNG (`secrets`), never stored. Not `manual_seed(secrets.randbits(...))`: torch seeds MT19937 from the low 32
bits of the seed (`init_with_uint32`), so a seeded generator is one of 2^32 streams, and a server holding one
site's update (which a server that fabricates SecAgg+ participants can unmask, docs/privacy.md) could replay
each candidate's sample and noise against it and subtract the noise of the one that fits (~3.6k CPU-hours of
Python at 42k weights, 2026-12-06 review). docs/hospital-guide.md says the same to the hospitals.
"""

from __future__ import annotations

import secrets
import struct
import warnings

import numpy as np
import torch


def dp_numpy_generator() -> np.random.Generator:
    """numpy's generator for a round's distributed-DP draws (randomized rounding, Skellam noise:
    privacy/distributed.py), seeded with 128 bits of the OS CSPRNG, never stored."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


# torch's CPU generator state (get_state / set_state, CPUGeneratorImplStateLegacy): the seed (uint64), `left` and
# `seeded` (int32), `next` (uint64), then MT19937's 624 words, one per uint64 slot, then the normal-sampling caches
_STATE_BYTES, _WORDS_AT, _MT_WORDS = 5056, 24, 624


def secret_state(generator: torch.Generator) -> torch.Generator:
    """Give `generator` an MT19937 state of 624 x 32 bits from the OS CSPRNG (never stored): every stream it can
    then draw is equally likely, not one of the 2^32 a `manual_seed` reaches (see above). Raises if torch's state
    layout is not the one checked here (a torch upgrade): a DP round is then refused, never run on a guessable
    generator."""
    seed = secrets.randbits(32)
    generator.manual_seed(seed)  # a valid state to overwrite: seeded, `left` = 1 (the next draw regenerates the words)
    state = generator.get_state().numpy().copy()
    words = np.frombuffer(state, dtype="<u8", count=_MT_WORDS, offset=_WORDS_AT)
    if (state.size != _STATE_BYTES or struct.unpack_from("<QiiQ", state, 0) != (seed, 1, 1, 0) or words[0] != seed
            or words[1] != (1812433253 * (seed ^ (seed >> 30)) + 1) & 0xFFFFFFFF):
        raise RuntimeError(f"torch {torch.__version__}'s generator state is not laid out as privacy/dp_randomness.py "
                           "expects, so the DP draws cannot be given a secret state: DP training is refused on this "
                           "torch; use the version pinned in pyproject.toml")
    secret = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    state[_WORDS_AT:_WORDS_AT + 8 * _MT_WORDS] = secret.view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def dp_generator() -> torch.Generator:
    """A generator for one round's DP draws, its state from the OS CSPRNG (unknown to anyone, the site too)."""
    return secret_state(torch.Generator())


def secret_dropout() -> None:
    """Give torch's global generator, which dropout and attention dropout draw from, a state from the OS CSPRNG for
    the rest of a DP round (after the model's initialisation from the run's public seed): see above."""
    secret_state(torch.default_generator)


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
