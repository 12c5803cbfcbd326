"""Small schemas and inputs for tests: every column kind, and any subset of modalities missing."""

from __future__ import annotations

import torch

from shared_models.schema import FeatureSchema, Modality
from simulations.synthetic import random_model_inputs


def tiny_schema(omics_width: int = 130, name: str = "tiny") -> FeatureSchema:
    return FeatureSchema(
        name=name,
        label_column="subtype",
        classes=["A", "B", "C"],
        modalities=[
            Modality(name="expr", kind="omics", features=[f"g{i}" for i in range(omics_width)]),
            Modality(name="prot", kind="omics", features=[f"p{i}" for i in range(20)]),
            Modality(
                name="clinical", kind="tabular", features=["age", "stage", "smoker"],
                column_types={"stage": "categorical", "smoker": "binary"}, levels={"stage": ["I", "II", "III"]},
            ),
            Modality(name="mutation", kind="tabular", features=[f"m{i}" for i in range(8)],
                     column_types={f"m{i}": "binary" for i in range(8)}),
        ],
    )


def random_inputs(schema: FeatureSchema, n: int, seed: int = 0) -> torch.Tensor:
    """Valid model inputs: standard normals, level indices for categoricals, 0/1 for binaries."""
    return random_model_inputs(schema, n, seed)


def drop_modalities(schema: FeatureSchema, x: torch.Tensor, row: int, names: list[str]) -> None:
    layout = schema.layout()
    for name in names:
        x[row, layout.slices[name]] = float("nan")
