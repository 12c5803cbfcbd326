"""A site's DP draws (Poisson sampling, Gaussian noise) come from a secret seed, not from the run's seeds."""

from __future__ import annotations

import warnings

import torch

from privacy.dp_randomness import dp_generator, private_engine


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
