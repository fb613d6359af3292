"""Has the data moved? A two-sample test on embeddings: MMD with an RBF kernel and a permutation test.

The reference sample is the champion's training data, the current sample a new data version or a
production batch, both embedded by the champion at the same layer (:mod:`components.model.embedding_store`).
The statistic is the (biased, V-statistic) squared maximum mean discrepancy with a Gaussian kernel
whose bandwidth is the median pairwise distance of the pooled sample (the median heuristic); its
p-value comes from relabelling the pooled sample ``permutations`` times. A permutation p-value
``(1 + #{permuted >= observed}) / (1 + permutations)`` is exact under the null (both samples from one
distribution) for any statistic, so the false-positive rate is at most ``alpha`` by construction —
the tests measure it. Both samples are subsampled (seeded) to ``max_samples`` rows each: the kernel
matrix is (2 max_samples)^2 and all permutations cost one matrix product.

A classifier two-sample test rides along as an effect size people can read: the cross-validated
ROC AUC of a logistic regression telling the two samples apart (0.5: indistinguishable).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.core import report as kit


@dataclass(frozen=True)
class DriftResult:
    """The verdict of one two-sample test, with what it compared."""

    statistic: float
    """Squared MMD of the (subsampled) samples: 0 when they coincide; scale set by the kernel."""
    p_value: float
    alpha: float
    drifted: bool
    """p_value < alpha: the current sample does not come from the reference distribution."""
    n_reference: int
    n_current: int
    """Rows actually compared (after subsampling)."""
    permutations: int
    bandwidth: float
    """The RBF kernel's sigma (median pairwise distance of the pooled sample)."""
    classifier_auc: float | None = None
    """Cross-validated AUC of a classifier separating the samples (None: not computed)."""
    method: str = "mmd-rbf-permutation"
    layer: str = ""
    reference: str = ""
    """What the reference sample is (e.g. ``champion v3 training data <data version>``)."""
    current: str = ""

    @property
    def verdict(self) -> str:
        return "drifted" if self.drifted else "no drift detected"

    def summary(self) -> str:
        """One line for logs and the CLI."""
        auc = f", classifier AUC {self.classifier_auc:.3f}" if self.classifier_auc is not None else ""
        return (
            f"{self.verdict}: MMD² {self.statistic:.4g}, p = {self.p_value:.4f} (alpha {self.alpha}){auc}; "
            f"{self.n_current} vs {self.n_reference} embeddings"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` rows of x, drawn without replacement (all of them, in order, when x is smaller)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) <= n:
        return x
    return x[np.sort(rng.choice(len(x), size=n, replace=False))]


def squared_distances(z: np.ndarray) -> np.ndarray:
    """z: (N, D) -> (N, N) squared Euclidean distances (clipped at 0 against rounding)."""
    sq = np.einsum("ij,ij->i", z, z)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def median_bandwidth(d2: np.ndarray) -> float:
    """The median heuristic: sigma = the median distance between distinct pooled points (1.0 when all
    points coincide, where any bandwidth gives the same zero statistic)."""
    off = d2[np.triu_indices_from(d2, k=1)]
    med = float(np.median(off)) if off.size else 0.0
    return float(np.sqrt(med)) if med > 0 else 1.0


def mmd_permutation_test(
    reference: np.ndarray,
    current: np.ndarray,
    *,
    alpha: float = 0.05,
    permutations: int = 200,
    max_samples: int = 1000,
    seed: int = 0,
) -> DriftResult:
    """Two-sample MMD test of reference (N, D) against current (M, D) embeddings."""
    if len(reference) < 2 or len(current) < 2:
        raise ValueError(
            f"a two-sample test needs >= 2 rows per sample, got {len(reference)} and {len(current)}"
        )
    rng = np.random.default_rng(seed)
    x, y = subsample(reference, max_samples, rng), subsample(current, max_samples, rng)
    z = np.concatenate([x, y])
    d2 = squared_distances(z)
    sigma = median_bandwidth(d2)
    kernel = np.exp(-d2 / (2.0 * sigma**2))
    n, m = len(x), len(y)
    # MMD² (V-statistic) = w' K w with w = +1/n on reference rows and -1/m on current rows; a
    # permutation relabels the pooled rows, i.e. permutes w. All permutations: one (N, N) x (N, P) product.
    w = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    perms = (
        np.stack([rng.permutation(w) for _ in range(permutations)], axis=1)
        if permutations
        else w[:, None][:, :0]
    )
    observed = float(w @ kernel @ w)
    null = np.einsum("ip,ip->p", perms, kernel @ perms)
    # Ties count as extreme (>=, with a tolerance for rounding): the p-value stays valid.
    exceed = int(np.sum(null >= observed - 1e-12 * max(abs(observed), 1.0)))
    p_value = (1 + exceed) / (1 + permutations)
    return DriftResult(
        statistic=max(observed, 0.0),
        p_value=p_value,
        alpha=alpha,
        drifted=p_value < alpha,
        n_reference=n,
        n_current=m,
        permutations=permutations,
        bandwidth=sigma,
    )


def classifier_auc(reference: np.ndarray, current: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling current rows (1) from reference rows (0):
    0.5 means the embeddings cannot be told apart, 1.0 that they never overlap."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference, current]).astype(np.float64)
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(current))])
    k = max(2, min(folds, len(reference), len(current)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    scores = cross_val_predict(
        clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(y, scores))


def drift_test(
    reference: np.ndarray,
    current: np.ndarray,
    *,
    alpha: float = 0.05,
    permutations: int = 200,
    max_samples: int = 1000,
    seed: int = 0,
    with_classifier: bool = True,
    layer: str = "",
    reference_name: str = "",
    current_name: str = "",
) -> DriftResult:
    """The MMD permutation test, plus the classifier two-sample AUC on the same subsamples."""
    from dataclasses import replace

    result = mmd_permutation_test(
        reference, current, alpha=alpha, permutations=permutations, max_samples=max_samples, seed=seed
    )
    auc = None
    if with_classifier:
        rng = np.random.default_rng(seed)
        auc = classifier_auc(
            subsample(reference, max_samples, rng), subsample(current, max_samples, rng), seed=seed
        )
    return replace(result, classifier_auc=auc, layer=layer, reference=reference_name, current=current_name)


def drift_section(drift: Mapping[str, Any] | None, *, title: str = "Data drift") -> kit.Section | None:
    """A report section for a drift test's ``to_dict()`` (``status: not measured`` with a reason is
    shown as such); None when nothing was compared."""
    if drift is None:
        return None
    if drift.get("status") == "not measured":
        return kit.section(title, kit.badge("not measured", "warn"), kit.paragraph(drift.get("reason", "")))
    drifted = bool(drift.get("drifted"))
    verdict = kit.badge("drifted" if drifted else "no drift detected", "fail" if drifted else "pass")
    auc = drift.get("classifier_auc")
    rows = [
        ("Compared", f"{drift.get('current', '')} vs {drift.get('reference', '')}"),
        (
            "Embeddings",
            f"{drift.get('layer', '')} layer; {drift.get('n_current')} vs {drift.get('n_reference')} rows",
        ),
        ("MMD² (RBF, median bandwidth)", kit.num(drift.get("statistic"), 5)),
        (
            "Permutation p-value",
            f"{kit.num(drift.get('p_value'), 4)} ({drift.get('permutations')} permutations)",
        ),
        ("Significance level (drift.alpha)", drift.get("alpha")),
        ("Classifier two-sample AUC", kit.num(auc, 3) if auc is not None else "not computed"),
    ]
    explain = (
        "A two-sample test on the model's embeddings: a p-value below alpha says the new images do not come "
        "from the distribution the model was trained on. The classifier AUC is the effect size "
        "(0.5: indistinguishable, 1.0: fully separable)."
    )
    return kit.section(title, verdict, kit.key_values(rows), kit.note(explain))
