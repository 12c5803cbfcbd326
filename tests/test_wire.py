"""A message's arrays travel packed (shared_models/wire.py): byte-identical after unpacking, and a model message
is a handful of Flower objects (each one HTTP request of a SuperNode) instead of ~180."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from privacy.run_config import load_run_config
from shared_models.model import MultiModalTransformer
from shared_models.schema import FeatureSchema
from shared_models.weights import state_arrays
from shared_models.wire import is_packed, pack, unpack
from simulations.federation import PANCAN_SCHEMA


def _model_arrays() -> list[np.ndarray]:
    torch.manual_seed(0)
    cfg = load_run_config({"schema": str(PANCAN_SCHEMA)})
    return state_arrays(MultiModalTransformer(FeatureSchema.load(PANCAN_SCHEMA), cfg.model))


def test_packed_content_unpacks_to_the_same_bytes_for_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32), rng.integers(0, 2**31, size=7).astype(np.int64),
              np.zeros((0,), np.float32), np.array(3.5, np.float64), rng.integers(0, 2**32, size=5, dtype=np.uint32)]
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {"round": 2}), keep_input=True)
    packed = pack(content)
    assert is_packed(packed) and len(packed["fitins.parameters"]) == 1
    back = compat.recorddict_to_fitins(unpack(packed), keep_input=True)
    out = parameters_to_ndarrays(back.parameters)
    assert [(a.dtype, a.shape, a.tobytes()) for a in arrays] == [(b.dtype, b.shape, b.tobytes()) for b in out]
    assert back.config == {"round": 2}


def test_content_without_many_arrays_passes_through_and_unpacked_content_is_left_alone():
    small = RecordDict({"config": ConfigRecord({"stage": "setup"}), "one": ArrayRecord([np.ones(3, np.float32)])})
    assert pack(small) is small and unpack(small) is small
    res = compat.fitres_to_recorddict(FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.ones(2)] * 3), 5, {}),
                                      keep_input=True)
    assert unpack(res) is res  # a peer that does not pack still interoperates


def test_a_model_message_is_a_few_objects_instead_of_two_per_tensor():
    arrays = _model_arrays()
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {}), keep_input=True)
    plain, packed = len(get_all_nested_objects(content)), len(get_all_nested_objects(pack(content)))
    assert len(arrays) > 50 and plain > 2 * len(arrays) * 0.8 and packed <= 8, (plain, packed)
