"""Feature statistics that add up across ranks, and the metrics computed from them.

Every rank accumulates float64 Σx and Σxxᵀ over its own images and the sums are all-reduced (EDM2
calculate_metrics.py pattern, docs/engineering-notes.md §C): no features or images travel, and the result does not depend
on how the images were split over ranks. Float64 matters (docs/engineering-notes.md §B.2: float32 accumulation made
torcheval drift). Inception Score is accumulated the same way, per split of sample indices. Precision/recall
need the features themselves (k-NN), so only that metric keeps and gathers them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dimscale.distributed import comm_device


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


class FeatureStats:
    """Running float64 sums over one detector's outputs: Σx, Σxxᵀ, IS split sums, optionally the features."""

    def __init__(self, dim: int, num_classes: int = 0, is_split: int = 5000, keep_features: bool = False):
        self.dim, self.num_classes, self.is_split = dim, num_classes, is_split
        self.n = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)                   # Σx   (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)            # Σxxᵀ (D, D)
        # Inception Score (ADM evaluator.py compute_inception_score): splits are fixed blocks of sample
        # indices, so the splits are the same whatever the number of ranks. They grow as indices arrive.
        self.p_sum = torch.zeros(0, num_classes, dtype=torch.float64)     # Σ p(y|x) per split   (S, K)
        self.plogp_sum = torch.zeros(0, dtype=torch.float64)              # Σ Σ_y p log p per split (S,)
        self.split_n = torch.zeros(0, dtype=torch.float64)                # images per split   (S,)
        self.keep_features = keep_features
        self._kept_idx, self._kept = [], []

    def update(self, features: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor | None = None):
        """Add a batch: features (B, D), the global sample indices (B,), optional class logits (B, K)."""
        x = features.detach().to(torch.float64)      # sums live where the detector runs (GPU: fp64 is cheap)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got {tuple(x.shape)}")
        if self.sum.device != x.device:
            self.sum, self.outer = self.sum.to(x.device), self.outer.to(x.device)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        if self.num_classes and logits is not None:
            logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
            p = logp.exp()
            split = torch.as_tensor(indices, dtype=torch.long).cpu() // self.is_split
            self._grow_splits(int(split.max()) + 1)
            self.p_sum.index_add_(0, split, p)
            self.plogp_sum.index_add_(0, split, (p * logp).sum(1))
            self.split_n.index_add_(0, split, torch.ones(len(split), dtype=torch.float64))
        if self.keep_features:
            self._kept_idx.append(torch.as_tensor(indices, dtype=torch.long).cpu())
            self._kept.append(features.detach().to("cpu", torch.float32))

    def _grow_splits(self, num_splits: int):
        extra = num_splits - len(self.split_n)
        if extra > 0:
            self.p_sum = torch.cat([self.p_sum, torch.zeros(extra, self.num_classes, dtype=torch.float64)])
            self.plogp_sum = torch.cat([self.plogp_sum, torch.zeros(extra, dtype=torch.float64)])
            self.split_n = torch.cat([self.split_n, torch.zeros(extra, dtype=torch.float64)])

    def all_reduce(self):
        """Sum the statistics of all ranks (in place); every rank ends with the totals. A no-op on one process."""
        if not _dist_on():
            return self
        device = comm_device()
        num_splits = torch.tensor(len(self.split_n), device=device)
        dist.all_reduce(num_splits, op=dist.ReduceOp.MAX)              # ranks may have seen fewer splits
        self._grow_splits(int(num_splits))
        for name in ("n", "sum", "outer", "p_sum", "plogp_sum", "split_n"):
            t = getattr(self, name).to(device)
            dist.all_reduce(t)
            setattr(self, name, t.cpu())
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) as float64 numpy; sigma is the unbiased covariance (np.cov, pytorch-fid)."""
        n = self.n.item()
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {int(n)}")
        mu = self.sum.cpu() / n
        sigma = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()

    def inception_score(self) -> tuple[float, float]:
        """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))) (ADM evaluator.py, splits of `is_split`)."""
        if not self.num_classes or self.split_n.sum() == 0:
            raise ValueError("no logits were accumulated; Inception Score needs a detector with class logits")
        used = self.split_n > 0
        n = self.split_n[used]
        p_marg = self.p_sum[used] / n[:, None]                                       # p(y) per split
        # E_x Σ_y p log p - Σ_y p(y) log p(y)  ==  E_x KL(p(y|x) || p(y))  (the cross term averages to p(y))
        marg_ent = torch.where(p_marg > 0, p_marg * torch.log(p_marg), torch.zeros_like(p_marg)).sum(1)
        scores = torch.exp(self.plogp_sum[used] / n - marg_ent)
        return scores.mean().item(), scores.std(unbiased=False).item() if len(scores) > 1 else 0.0

    def gathered_features(self) -> torch.Tensor:
        """All ranks' kept features in sample-index order, (N, D) float32, on every rank."""
        if not self.keep_features:
            raise ValueError("features were not kept; build FeatureStats(keep_features=True) for precision/recall")
        idx = torch.cat(self._kept_idx) if self._kept_idx else torch.zeros(0, dtype=torch.long)
        feats = torch.cat(self._kept) if self._kept else torch.zeros(0, self.dim)
        if _dist_on():
            idx, feats = all_gather_rows(idx, feats)
        return feats[torch.argsort(idx)]


def all_gather_rows(idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (indices (n,), rows (n, ...)) of unequal n from all ranks, padded to the largest n."""
    device, world = comm_device(), dist.get_world_size()
    count = torch.tensor([len(idx)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    pad_idx = torch.full((most,), -1, dtype=torch.long, device=device)
    pad_idx[:len(idx)] = idx.to(device)
    pad_rows = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=device)
    pad_rows[:len(rows)] = rows.to(device)
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_rows, pad_rows)
    idx, rows = torch.cat(all_idx).cpu(), torch.cat(all_rows).cpu()
    keep = idx >= 0
    return idx[keep], rows[keep]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1-μ2‖² + tr Σ1 + tr Σ2 - 2 tr (Σ1Σ2)^½  (Heusel et al. 2017, eq. 6), in float64.

    tr (Σ1Σ2)^½ = Σ √λ(Σ1^½ Σ2 Σ1^½): that matrix is symmetric PSD, so a symmetric eigensolver gives it
    without the complex round-off that sqrtm of the non-symmetric Σ1Σ2 produces on rank-deficient covariances.
    Eigenvalues below the solver's round-off (D·eps·λmax) are set to 0: √ amplifies 1e-16 noise to 1e-8, which
    would make the distance depend on summation order (e.g. the number of ranks) for rank-deficient Σ.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape} "
                         "(were both computed with the same detector?)")

    def psd_eigvals(w):
        return np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0), w, 0.0)

    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * np.sqrt(psd_eigvals(w))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _kth_neighbour_radii(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest other row (ADM ManifoldEstimator, self excluded)."""
    radii = torch.empty(len(feats), dtype=torch.float64)
    for i in range(0, len(feats), block):
        d = _sq_dists(feats[i:i + block], feats)
        radii[i:i + block] = d.kthvalue(k + 1, dim=1).values        # +1: the row itself sits at distance 0
    return radii


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (len(a), len(b)) in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point, whether it lies within radius of at least one centre's k-NN ball."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for i in range(0, len(points), block):
        d = _sq_dists(points[i:i + block], centres)
        inside[i:i + block] = (d <= radii[None, :]).any(1)
    return inside


def precision_recall(ref: torch.Tensor, samples: torch.Tensor, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN manifolds, k=3 as the ADM suite.

    precision = share of samples inside the reference manifold; recall = share of references inside the
    sample manifold. ref (N, D), samples (M, D).
    """
    if len(ref) <= k or len(samples) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} reference and sample features, "
                         f"got {len(ref)} and {len(samples)}")
    precision = _inside_manifold(samples, ref, _kth_neighbour_radii(ref, k, block), block).double().mean().item()
    recall = _inside_manifold(ref, samples, _kth_neighbour_radii(samples, k, block), block).double().mean().item()
    return precision, recall
