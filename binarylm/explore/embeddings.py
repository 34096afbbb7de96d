"""A map of the token embeddings: every token's vector projected on the plane where they spread most.

Principal component analysis. Centre the embedding table E (V, C) on its mean; the directions
along which the centred rows vary most are the eigenvectors of the covariance matrix
E^T E / (V - 1) (C, C), and each eigenvalue is the variance along its direction. Projecting every
row on the first two gives a 2-D map where tokens the model treats alike tend to land close
together; each direction's `explained` share is its variance over the total.

The SVD is taken of the small (C, C) covariance, in float64, rather than of the tall (V, C) table:
the same directions and variances (for a symmetric positive semi-definite matrix the singular
vectors are its eigenvectors), ~20x faster for a vocabulary of 8192 at width 256.
"""

from __future__ import annotations

import torch
from torch import nn

from binarylm.explore.arrays import encode_array
from binarylm.explore.internals import token_texts


def embedding_map(model: nn.Module, tokenizer) -> dict:
    """The reply of GET /v1/explore/embeddings: {"xy": Array (V, 2), "texts": [V], "explained": [2]}."""
    table = model.token_embedding.weight.detach().to(dtype=torch.float64)  # (V, C)
    centred = table - table.mean(dim=0)  # (V, C)
    axes, variances = principal_axes(centred)  # (C, C), (C,)
    total = variances.sum()
    explained = (variances[:2] / total).tolist() if total > 0 else [0.0, 0.0]
    return {"xy": encode_array(centred @ axes[:, :2]),  # (V, 2)
            "texts": token_texts(tokenizer, range(table.shape[0])), "explained": explained}


def principal_axes(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The principal directions as columns (C, C) and the variance along each (C,), largest first, of the
    centred rows (N, C). Each direction is signed so that its largest entry is positive, so the map of the
    same table never comes out mirrored."""
    covariance = centred.T @ centred / max(centred.shape[0] - 1, 1)  # (C, C)
    directions, variances, _ = torch.linalg.svd(covariance)  # (C, C) columns, (C,) descending
    largest = directions.abs().argmax(dim=0)  # (C,) the row of each column's largest magnitude
    signs = directions[largest, torch.arange(directions.shape[1])].sign()  # (C,)
    return directions * torch.where(signs == 0, 1.0, signs), variances  # (C, C), (C,)
