"""The consortium contract shared by every site and the server: the feature schema and the model."""

from shared_models.model import ModelConfig, MultiModalTransformer
from shared_models.schema import ColumnType, FeatureSchema, Modality, ModalityKind, SchemaError, Transform
from shared_models.weights import SchemaMismatchError, load_weights, save_weights

__all__ = [
    "ColumnType", "FeatureSchema", "Modality", "ModalityKind", "ModelConfig", "MultiModalTransformer",
    "SchemaError", "SchemaMismatchError", "Transform", "load_weights", "save_weights",
]
