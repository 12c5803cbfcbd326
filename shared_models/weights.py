"""Model weights stamped with the schema they were trained under.

A weights file holds the state_dict, the model config and the schema's content hash. Loading it
under a different schema is refused: the input layout or classes would silently disagree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared_models.files import atomic_file
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.schema import FeatureSchema

WEIGHTS_FORMAT = "oncofed-weights/1"


class SchemaMismatchError(ValueError):
    """Weights trained under one schema offered to a model built from another."""


class WeightsFileError(ValueError):
    """A weights file that is missing, corrupt or not an OncoFed weights file."""


class ArrayCountError(ValueError):
    """Arrays of another model (or schema version) offered to this one."""


def state_arrays(model: torch.nn.Module) -> list:
    """The model's state as numpy arrays, in state_dict order (what travels between server and sites)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def trainable_layout(model: torch.nn.Module) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """(shapes in state_dict order, mask of the flattened coordinates that are trainable parameters): what a
    distributed round sends, and which of it carries gradients (and so noise). The one definition of the
    noised dimension, which sizes the Skellam plan at the server and at every site alike."""
    params = {k for k, p in model.named_parameters() if p.requires_grad}
    shapes, mask = [], []
    for k, v in model.state_dict().items():
        shapes.append(tuple(v.shape))
        mask.append(np.full(v.numel(), k in params))
    return shapes, np.concatenate(mask)


def load_arrays(model: torch.nn.Module, arrays) -> None:
    """Load arrays in state_dict order (as float32) into the model."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise ArrayCountError(f"received {len(arrays)} arrays for a model with {len(keys)} tensors: the sender runs "
                              "another model configuration or schema version")
    model.load_state_dict({k: torch.from_numpy(np.asarray(a, dtype=np.float32)).clone() for k, a in zip(keys, arrays)})


def arrays_sha256(arrays) -> str:
    """SHA-256 of a model's arrays as float32, in order: how the server announces a model and a site
    checks the one it received (both must compute it the same way)."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def check_schema_hash(schema: FeatureSchema, found: str, source: str) -> None:
    """Refuses a file stamped with another schema's hash (`FeatureSchema.matches`)."""
    if not schema.matches(found):
        raise SchemaMismatchError(
            f"{source}: these weights were trained under schema hash {str(found)[:12]}..., but the schema in use "
            f"has hash {schema.content_hash()[:12]}...; load them with the schema they were trained under (the "
            "consortium's schema JSON of that run), or retrain under the new schema"
        )


def save_weights(model: MultiModalTransformer, path: str | Path, extra: dict | None = None) -> Path:
    """Write weights atomically (`atomic_file`; owner-only, 0600): a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "schema_hash": model.schema_hash,
        "schema_name": model.schema.name,
        "config": model.config.model_dump(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    with atomic_file(path, "wb", owner_only=True) as fh:
        torch.save(payload, fh)
    return path


def read_weights(path: str | Path) -> dict:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: weights file not found") from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise WeightsFileError(f"{path}: not a readable OncoFed weights file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsFileError(f"{path}: not an OncoFed weights file (expected format {WEIGHTS_FORMAT!r})")
    return payload


def load_weights(path: str | Path, schema: FeatureSchema) -> MultiModalTransformer:
    """Build the model of a weights file under `schema`, refusing weights from another schema."""
    payload = read_weights(path)
    check_schema_hash(schema, payload["schema_hash"], str(path))
    model = MultiModalTransformer(schema, ModelConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model
