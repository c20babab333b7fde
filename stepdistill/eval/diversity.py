"""Diversity: how different the images of one prompt are across seeds.

Mean pairwise distance between the feature vectors of the images that share a prompt (several seeds),
averaged over the prompts that have at least two images. A generator that ignores its noise scores 0;
this is the quantity distilled few-step models lose (Gandikota & Bau, *Distilling Diversity and Control
in Diffusion Models*, 2025). Distances: ``"l2"`` (Euclidean, e.g. on Inception or toy features) or
``"cosine"`` (1 - cos, e.g. on normalised CLIP image embeddings).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

__all__ = ["mean_pairwise_distance"]


def mean_pairwise_distance(features: torch.Tensor, group_ids: Sequence[Hashable], metric: str = "l2") -> float:
    """Mean over groups (of >= 2 members) of the mean pairwise distance of ``features`` [N, D] in the group.
    ValueError when no group has two members."""
    group_ids = list(group_ids)
    if len(group_ids) != features.shape[0]:
        raise ValueError(f"diversity: {features.shape[0]} feature vectors but {len(group_ids)} group ids")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"diversity metric {metric!r}: choose 'l2' or 'cosine'")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        members[group].append(index)
    groups = [idx for idx in members.values() if len(idx) >= 2]
    if not groups:
        raise ValueError("diversity needs at least one prompt with two or more images (give several --seeds)")
    f = features.double()
    if metric == "cosine":
        f = torch.nn.functional.normalize(f, dim=-1)
    per_group = []
    for idx in groups:
        x = f[idx]
        d = torch.pdist(x) if metric == "l2" else 1 - (x @ x.T)[torch.triu_indices(len(idx), len(idx), 1).unbind()]
        per_group.append(d.mean())
    return float(torch.stack(per_group).mean())
