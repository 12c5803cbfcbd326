"""Small schemas and inputs for tests: every column kind, and any subset of modalities missing."""

from __future__ import annotations

import torch

from shared_models.schema import FeatureSchema, Modality


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
    g = torch.Generator().manual_seed(seed)
    layout = schema.layout()
    x = torch.randn(n, layout.n_inputs, generator=g)
    for m in schema.modalities:
        start = layout.slices[m.name].start
        for j, f in enumerate(m.features):
            t = m.column_type(f).value
            if t == "categorical":
                x[:, start + j] = torch.randint(0, len(m.levels[f]), (n,), generator=g).float()
            elif t == "binary":
                x[:, start + j] = torch.randint(0, 2, (n,), generator=g).float()
    return x


def drop_modalities(schema: FeatureSchema, x: torch.Tensor, row: int, names: list[str]) -> None:
    layout = schema.layout()
    for name in names:
        x[row, layout.slices[name]] = float("nan")
