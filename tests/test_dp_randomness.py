"""A site's DP draws (Poisson sampling, Gaussian noise) come from a secret seed, not from the run's seeds."""

from __future__ import annotations

import secrets
import warnings

import numpy as np
import torch

from privacy.dp_randomness import dp_generator, private_engine, secret_dropout


def test_dp_draws_do_not_follow_torchs_global_seed():
    draws = []
    for _ in range(2):
        torch.manual_seed(1234)  # what a site does from the run config, which the server knows
        draws.append(torch.normal(0.0, 1.0, (8,), generator=dp_generator()))
    assert not torch.equal(draws[0], draws[1])


def test_the_engine_samples_from_its_secret_generator_without_opacus_secure_rng_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = private_engine()
    assert isinstance(engine.secure_rng, torch.Generator) and engine.secure_mode is False
    model = torch.nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer, dp_loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                                                      data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                      noise_generator=engine.secure_rng)
    assert dp_loader.batch_sampler.generator is engine.secure_rng
    assert optimizer.generator is engine.secure_rng


def test_dp_generators_are_not_among_the_2_to_the_32_streams_a_seed_reaches(monkeypatch):
    # torch seeds MT19937 from a seed's low 32 bits: a generator made with manual_seed(secrets.randbits(63)) was one of
    # 2^32 streams, which a server holding one site's update could search for the noise. With every seed the same,
    # two DP generators (and two rounds' dropout masks) must still draw differently.
    monkeypatch.setattr(secrets, "randbits", lambda bits: 7)
    assert not torch.equal(torch.randn(16, generator=dp_generator()), torch.randn(16, generator=dp_generator()))
    masks = []
    for _ in range(2):
        secret_dropout()
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1])


def test_a_dp_generator_draws_the_mt19937_stream_of_624_secret_words(monkeypatch):
    # every one of the state's 624 x 32 bits comes from the CSPRNG: the draws are MT19937's from exactly those words
    key = np.random.default_rng(0).integers(0, 2**32, 624, dtype=np.uint32)
    monkeypatch.setattr(secrets, "token_bytes", lambda n: key.astype("<u4").tobytes()[:n])
    generator = dp_generator()
    reference = np.random.MT19937()
    reference.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    drawn = torch.empty(2000, dtype=torch.int32).random_(generator=generator)  # an MT19937 output's low 31 bits each
    assert np.array_equal(drawn.numpy(), (reference.random_raw(2000) & 0x7FFFFFFF).astype(np.int32))
