"""A site's DP draws (Poisson sampling, Gaussian noise) come from a secret seed, not from the run's seeds."""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import pytest
import torch

from privacy.dp_randomness import dp_generator, private_engine, secret_dropout
from privacy.sampling import opacus_poisson_loader


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


@pytest.mark.parametrize("rate", [0.3, 1e-5, 0.25])
def test_opacus_poisson_loader_includes_a_patient_at_most_at_the_rate_the_accountant_charges(rate):
    # Opacus' sampler draws torch.rand(n) < rate in float32: multiples of 2^-24 against the rate rounded to float32,
    # so a patient is in with probability ceil(float32(rate) 2^24) / 2^24 (0.3: 0.3000000119 > 0.3)
    data = torch.utils.data.TensorDataset(torch.zeros(4000, 1))
    loader = opacus_poisson_loader(data, rate, torch.Generator().manual_seed(3))
    compared = float(torch.tensor(loader.batch_sampler.sample_rate, dtype=torch.float32))
    inclusion = math.ceil(compared * 2**24) / 2**24
    assert inclusion <= rate and rate - inclusion < 2**-24 and loader.sample_rate == rate  # the accountant's rate
    # and the batches are the comparison at that rate
    first = next(iter(loader.batch_sampler))
    assert first == (torch.rand(4000, generator=torch.Generator().manual_seed(3)) < compared).nonzero().view(-1).tolist()
