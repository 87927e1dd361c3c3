"""A k-means start for the router (MoEConfig.router_init="kmeans"): each expert's row
points at one cluster of the routing features of a sample of training units, so the
experts start on different data, not on noise (train/router_init.py gathers the sample)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def rows_from_clusters(features: torch.Tensor, num_experts: int, scale: float, seed: int):
    """The router's start: expert e's row points at the e-th spherical k-means cluster of
    `features` (N, H), routing features of training units as the router sees them. The
    features are normalised as in `router.logits` and centred on their mean (the router's
    feature_center), so a unit at a typical distance from the centre gets logit
    `scale` * cos(unit, centroid). Returns (gate weight (E, H), feature_center (H,),
    cluster sizes (E,))."""
    x = F.layer_norm(features.float(), features.shape[-1:])
    center = x.mean(dim=0)
    x = x - center
    centroids, assignment = spherical_kmeans(F.normalize(x, dim=-1), num_experts, seed)
    weight = centroids * (scale / x.norm(dim=-1).mean().clamp_min(1e-6))
    return weight, center, torch.bincount(assignment, minlength=num_experts)


def spherical_kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100):
    """k-means on the unit sphere (cosine similarity) of unit-norm `points` (N, H), seeded
    k-means++ style from `seed`, so every rank and every rerun finds the same clusters.
    Returns (unit centroids (k, H), assignment (N,)). Written out rather than taken from
    scikit-learn: twenty lines, on whatever device the features are, with no new dependency."""
    generator = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        nearest = (points @ points[chosen].T).max(dim=1).values
        weight = (1.0 - nearest).clamp_min(0.0).cpu() ** 2
        weight = weight if weight.sum() > 0 else torch.ones(n)
        chosen.append(int(torch.multinomial(weight, 1, generator=generator)))
    centroids = points[chosen].clone()
    for _ in range(iterations):
        assignment = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        empty = torch.bincount(assignment, minlength=k) == 0
        updated = torch.where(empty.unsqueeze(1), centroids, F.normalize(sums, dim=-1))
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, (points @ centroids.T).argmax(dim=1)
