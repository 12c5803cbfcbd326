"""The consortium contract shared by every site and the server: the feature schema and the model.

Names are imported lazily so that commands which never touch the model (validation, --help) do
not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "ColumnType": "schema", "FeatureSchema": "schema", "Modality": "schema", "ModalityKind": "schema",
    "SchemaError": "schema", "Transform": "schema",
    "ModelConfig": "run_config", "MultiModalTransformer": "model",
    "SchemaMismatchError": "weights", "load_weights": "weights", "save_weights": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"shared_models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'shared_models' has no attribute {name!r}")
