"""Signed model packages: the server signs what it delivers, a site installs only what verifies."""

from __future__ import annotations

import os

import pytest
import torch

from client.model_store import ModelStore, ModelStoreError
from privacy.signing import SignatureError, generate_signing_key, load_private, load_public, sign, verify
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.weights import arrays_sha256, save_weights
from tests.factories import tiny_schema

CFG = ModelConfig(dropout=0.0)


@pytest.fixture()
def keys(tmp_path):
    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    return load_private(tmp_path / "signing.key"), load_public(tmp_path / "signing.pub")


def _arrays(seed: int):
    torch.manual_seed(seed)
    return [v.numpy().copy() for v in MultiModalTransformer(tiny_schema(), CFG).state_dict().values()]


def _info(seed: int) -> dict:
    return {"run": "r1", "round": 10, "schema_hash": tiny_schema().content_hash(),
            "arrays_sha256": arrays_sha256(_arrays(seed)), "site_epsilon": {"C0": 7.96}}


def test_the_private_key_is_written_for_its_owner_only(tmp_path, keys):
    assert os.stat(tmp_path / "signing.key").st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "signing.key", 0o644)
    with pytest.raises(SignatureError, match="chmod 600"):
        load_private(tmp_path / "signing.key")


def test_a_signed_package_verifies_and_any_change_breaks_it(keys):
    private, public = keys
    signed = sign(_info(0), private)
    verify(signed, public)
    for field, value in (("site_epsilon", {"C0": 1.0}), ("arrays_sha256", "0" * 64), ("round", 11)):
        with pytest.raises(SignatureError, match="altered after signing"):
            verify({**signed, field: value}, public)
    with pytest.raises(SignatureError, match="not signed"):
        verify(_info(0), public)


def test_a_package_signed_by_another_key_is_refused(tmp_path, keys):
    _, public = keys
    generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="signed by another key"):
        verify(sign(_info(0), load_private(tmp_path / "other.key")), public)


def test_the_store_reverifies_an_installed_package_down_to_its_weights(tmp_path, keys):
    private, public = keys
    store = ModelStore(tmp_path / "models")
    version = store.install(tiny_schema(), CFG, _arrays(0), sign(_info(0), private),
                            expected_arrays_sha256=_info(0)["arrays_sha256"])
    assert store.verify(version, signing_public_key=public)["round"] == 10
    # swap in other weights and fix up the file hash: the signature still catches it
    model = MultiModalTransformer(tiny_schema(), CFG)
    model.load_state_dict({k: torch.from_numpy(a) for k, a in zip(model.state_dict(), _arrays(1))})
    save_weights(model, tmp_path / "models" / version / "weights.pt")
    import json

    from shared_models.files import sha256_file

    pkg = tmp_path / "models" / version / "package.json"
    data = json.loads(pkg.read_text())
    data["weights_sha256"] = sha256_file(tmp_path / "models" / version / "weights.pt")
    pkg.write_text(json.dumps(data))
    with pytest.raises(ModelStoreError, match="not the ones the server signed"):
        store.verify(version, signing_public_key=public)
