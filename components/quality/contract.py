"""The data contract: what the first accepted data version looked like, so later versions are judged
against *this* dataset rather than against numbers tuned on another one (TFX's SchemaGen +
ExampleValidator, as one reviewable YAML file).

:func:`infer_contract` summarises a manifest: the classes and their shares, the image modes and
channel counts, 21 quantiles (0, 5, ..., 100 %) of each image property ingestion measured
(brightness, contrast, blur, width, height, aspect) and a cheap-feature "embedding" summary (mean
and covariance of brightness, contrast, log blur and log pixels; no model is needed, so it exists
from the first version on; the champion's embeddings are compared separately by the drift check).
:func:`write_contract` saves it as ``data_contract.yaml`` with its tolerances (``checks:``), for a
person to review, edit and commit; :func:`load_contract` reads it back and names any unknown key or
malformed value (a :class:`~components.core.errors.ConfigError`, exit code 2).

:func:`compare_to_contract` measures a later version against it: per property a one-sample
Kolmogorov-Smirnov test against the reference distribution (its quantile function interpolated) and
the population stability index over the reference's deciles; a shift needs both significance
(p < ``alpha``) and size (KS statistic >= ``min_ks_statistic`` or PSI >= ``max_psi``), so a large
dataset does not fail on differences nobody would care about, nor a small one on noise. The class
shares and mode shares are compared too. The verdicts become Great Expectations expectations in
:mod:`components.quality.validation` (the contract's tables are plain frames GE checks).

Why one YAML file in the project folder (beside ``data/``, like ``params.yaml``) and not
``data/profile.json``: the contract is a decision a team reviews and commits (the classes it expects,
how much drift it tolerates); ``data/`` is the data version DVC tracks and rewrites on every ingest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.core.errors import ConfigError
from components.core.jsonio import write_text_atomic

CONTRACT_VERSION = 1
QUANTILES: tuple[float, ...] = tuple(i / 20 for i in range(21))
"""Probabilities of the stored quantiles: 0, 5, ..., 100 %."""
PROPERTIES: tuple[str, ...] = ("brightness", "contrast", "blur", "width", "height", "aspect")
"""Manifest columns whose distribution the contract keeps."""
EMBEDDING_FEATURES: tuple[str, ...] = ("brightness", "contrast", "log_blur", "log_pixels")
ACCEPT_HINT = (
    "if the data is meant to change, run `imgflow contract accept` (re-infers data_contract.yaml from "
    "this data version; review the diff and commit it) or edit data_contract.yaml"
)
_SIGNIFICANT = 5
"""Significant digits of the numbers written to the YAML file (readable, and plenty for the tests)."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ContractChecks(_Strict):
    """The tolerances of the contract, edited in its ``checks:`` section."""

    alpha: float = Field(default=0.01, gt=0, lt=1)
    """A property's distribution may have shifted only when the KS test's p-value is below this."""
    min_ks_statistic: float = Field(default=0.1, ge=0, le=1)
    """... and the KS statistic (largest gap between the two CDFs) reaches this ..."""
    max_psi: float = Field(default=0.25, ge=0)
    """... or the population stability index over the reference deciles reaches this (0.25: the
    usual "significant shift" cut-off)."""
    max_share_change: float = Field(default=0.1, ge=0, le=1)
    """A class's (or image mode's) share of the images may move at most this much (absolute)."""
    min_embedding_shift: float = Field(default=0.3, ge=0)
    """The cheap-feature mean may move at most this many reference standard deviations
    (Mahalanobis), when the move is significant at ``alpha``."""


class EmbeddingSummary(_Strict):
    """Mean and covariance of the cheap per-image features (:data:`EMBEDDING_FEATURES`)."""

    features: tuple[str, ...] = EMBEDDING_FEATURES
    mean: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]

    @model_validator(mode="after")
    def _shapes_agree(self) -> EmbeddingSummary:
        k = len(self.features)
        if len(self.mean) != k or len(self.cov) != k or any(len(row) != k for row in self.cov):
            raise ValueError(f"mean must have {k} numbers and cov {k}x{k} (one per feature of features)")
        return self


class DataContract(_Strict):
    """The reference a data version is validated against (``data_contract.yaml``)."""

    version: int = CONTRACT_VERSION
    inferred_from: dict[str, Any] = Field(default_factory=dict)
    """Where it came from: ``data_version``, ``images``, ``created`` (informational)."""
    classes: tuple[str, ...]
    class_shares: dict[str, float]
    modes: dict[str, float]
    channels: dict[int, float]
    distributions: dict[str, tuple[float, ...]]
    """Property -> its 21 quantiles (:data:`QUANTILES`)."""
    embedding: EmbeddingSummary | None = None
    checks: ContractChecks = ContractChecks()

    @field_validator("classes")
    @classmethod
    def _classes_not_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one class is needed")
        if len(set(v)) != len(v):
            raise ValueError("a class is listed twice")
        return v

    @field_validator("class_shares", "modes", "channels")
    @classmethod
    def _shares(cls, v: dict[Any, float]) -> dict[Any, float]:
        bad = {k: s for k, s in v.items() if not 0 <= s <= 1}
        if bad:
            raise ValueError(f"shares must be within [0, 1], got {bad}")
        return v

    @field_validator("distributions")
    @classmethod
    def _quantiles(cls, v: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        unknown = sorted(set(v) - set(PROPERTIES))
        if unknown:
            raise ValueError(f"unknown property {unknown}; known: {', '.join(PROPERTIES)}")
        for name, q in v.items():
            if len(q) != len(QUANTILES):
                raise ValueError(
                    f"{name}: expected {len(QUANTILES)} quantiles (0, 5, ..., 100 %), got {len(q)}"
                )
            if any(b < a for a, b in zip(q, q[1:], strict=False)):
                raise ValueError(f"{name}: quantiles must not decrease")
        return v

    @model_validator(mode="after")
    def _shares_name_classes(self) -> DataContract:
        unknown = sorted(set(self.class_shares) - set(self.classes))
        if unknown:
            raise ValueError(f"class_shares names {unknown}, which are not in classes")
        return self

    @property
    def images(self) -> int:
        """How many images the reference had (sets the power of the tests); 0 when unknown."""
        return int(self.inferred_from.get("images") or 0)


# --------------------------------------------------------------------------- inference


def infer_contract(
    df: pd.DataFrame,
    *,
    classes: Sequence[str],
    data_version: str = "",
    labels: pd.Series | None = None,
    checks: ContractChecks | None = None,
) -> DataContract:
    """The contract of a manifest (all splits together). labels: what the class shares count (default
    the ``label`` column; multi-label data passes one entry per (image, label) occurrence); checks:
    the tolerances to write (default :class:`ContractChecks`, or an edited file's, kept on re-inference)."""
    labels = (df["label"] if labels is None else labels).astype(str)
    total = max(len(labels), 1)
    counts = labels.value_counts()
    return DataContract(
        inferred_from={
            "data_version": data_version,
            "images": len(df),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        classes=tuple(str(c) for c in classes),
        class_shares={str(c): _round(counts.get(c, 0) / total) for c in classes},
        modes=_shares_of(df["mode"].astype(str)) if "mode" in df.columns else {},
        channels={int(k): v for k, v in _shares_of(df["channels"]).items()}
        if "channels" in df.columns
        else {},
        distributions={p: _quantiles_of(df[p]) for p in PROPERTIES if p in df.columns},
        embedding=_embedding_of(df),
        checks=checks or ContractChecks(),
    )


def _shares_of(values: pd.Series) -> dict[str, float]:
    shares = values.value_counts(normalize=True)
    return {str(k): _round(float(v)) for k, v in shares.sort_index().items()}


def _quantiles_of(column: pd.Series) -> tuple[float, ...]:
    values = pd.to_numeric(column, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if values.size == 0:
        return tuple(0.0 for _ in QUANTILES)
    q = np.quantile(values, QUANTILES)
    return tuple(float(x) for x in np.maximum.accumulate([_round(float(x)) for x in q]))


def cheap_features(df: pd.DataFrame) -> np.ndarray | None:
    """(N, 4) brightness, contrast, log1p(blur), log(width x height); None when a column is missing."""
    needed = ("brightness", "contrast", "blur", "width", "height")
    if not set(needed) <= set(df.columns) or len(df) == 0:
        return None
    cols = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in needed}
    out = np.column_stack([cols["brightness"], cols["contrast"], np.log1p(np.maximum(cols["blur"], 0)),
                           np.log(np.maximum(cols["width"] * cols["height"], 1))])  # fmt: skip
    return out[np.isfinite(out).all(axis=1)]


def _embedding_of(df: pd.DataFrame) -> EmbeddingSummary | None:
    x = cheap_features(df)
    if x is None or len(x) < 2:
        return None
    cov = np.cov(x, rowvar=False)
    return EmbeddingSummary(
        mean=tuple(_round(float(v)) for v in x.mean(axis=0)),
        cov=tuple(tuple(_round(float(v)) if abs(v) > 1e-12 else 0.0 for v in row) for row in cov),
    )


def _round(x: float) -> float:
    return float(f"{x:.{_SIGNIFICANT}g}")


# --------------------------------------------------------------------------- the file


def write_contract(path: Path, contract: DataContract) -> Path:
    """Write ``contract`` as commented YAML (atomically); returns ``path``."""
    raw = contract.model_dump(mode="json")
    raw["channels"] = {int(k): v for k, v in raw["channels"].items()}
    raw["distributions"] = {k: _FlowList(v) for k, v in raw["distributions"].items()}
    if raw.get("embedding"):
        emb = raw["embedding"]
        raw["embedding"] = {"features": _FlowList(emb["features"]), "mean": _FlowList(emb["mean"]),
                            "cov": [_FlowList(r) for r in emb["cov"]]}  # fmt: skip
    body = yaml.dump(raw, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
    origin = contract.inferred_from
    header = (
        f"# imgflow data contract, inferred from data version {origin.get('data_version') or '?'} "
        f"({origin.get('images', '?')} images).\n"
        "# Review it, edit it and commit it: every later data version is validated against it\n"
        "# (`imgflow validate`). classes: the classes expected (a new one is refused); class_shares /\n"
        "# modes / channels: shares of the images; distributions: 21 quantiles (0, 5, ..., 100 %) of\n"
        "# each image property; embedding: mean/covariance of cheap features; checks: the tolerances.\n"
        "# `imgflow contract accept` re-infers it from the current data version (checks are kept).\n"
    )
    write_text_atomic(Path(path), header + body)
    return Path(path)


class _FlowList(list[Any]):
    """A list YAML writes on one line (quantiles, means)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=True)
)


def load_contract(path: Path) -> DataContract | None:
    """The contract in ``path``; None when the file does not exist. A file that is not YAML, has an
    unknown key or a malformed value is a ConfigError naming the key (and how to start over)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}\n{_restart_hint(path)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping (classes:, checks:, ...); {_restart_hint(path)}")
    try:
        return DataContract.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, path)) from None


def _format_errors(err: ValidationError, path: Path) -> str:
    lines = [f"invalid data contract {path}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (check the spelling; known: {_known_keys(e['loc'])})")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {e.get('input')!r})")
    lines.append(_restart_hint(path))
    return "\n".join(lines)


def _known_keys(loc: tuple[Any, ...]) -> str:
    """The keys allowed where ``loc`` (an unknown key's location) points, e.g. those of ``checks``."""
    model: type[BaseModel] = DataContract
    for part in loc[:-1]:
        inner = _model_of(model.model_fields.get(str(part)))
        if inner is None:
            return "see docs/validation.md"
        model = inner
    return ", ".join(model.model_fields)


def _model_of(field: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``X`` or ``X | None``), else None."""
    annotation = getattr(field, "annotation", None)
    candidates = (annotation, *getattr(annotation, "__args__", ()))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _restart_hint(path: Path) -> str:
    return f"Fix the key above, or delete {path} and run `imgflow contract accept` to infer it again."


# --------------------------------------------------------------------------- comparison

FEATURE_COLUMNS: tuple[str, ...] = (
    "feature", "kind", "statistic", "p_value", "psi", "reference", "observed", "shifted",
)  # fmt: skip
SHARE_COLUMNS: tuple[str, ...] = ("label", "reference_share", "share", "change")


@dataclass(frozen=True)
class ContractComparison:
    """A data version measured against a contract: one row per property / summary (``features``:
    :data:`FEATURE_COLUMNS`; ``shifted`` is the verdict) and one per class (``shares``)."""

    features: pd.DataFrame
    shares: pd.DataFrame
    new_classes: tuple[str, ...]
    vanished_classes: tuple[str, ...]


def compare_to_contract(
    df: pd.DataFrame, contract: DataContract, *, label_column: str = "label"
) -> ContractComparison:
    """Measure ``df`` (a manifest, or multi-label label rows for the shares) against ``contract``."""
    checks = contract.checks
    rows = [
        _distribution_row(name, df[name], q, contract.images, checks)
        for name, q in contract.distributions.items()
        if name in df.columns
    ]
    if "mode" in df.columns and contract.modes:
        rows.append(_categorical_row("mode", df["mode"].astype(str), contract.modes, checks))
    if "channels" in df.columns and contract.channels:
        observed = df["channels"].astype(str)
        rows.append(_categorical_row("channels", observed, {str(k): v for k, v in contract.channels.items()},
                                     checks))  # fmt: skip
    if contract.embedding is not None and (x := cheap_features(df)) is not None and len(x):
        rows.append(_embedding_row(x, contract.embedding, contract.images, checks))
    features = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS)).astype({"shifted": bool})
    labels = df[label_column].astype(str) if label_column in df.columns else pd.Series([], dtype=str)
    seen = set(labels)
    return ContractComparison(
        features=features,
        shares=_share_table(labels, contract),
        new_classes=tuple(sorted(seen - set(contract.classes))),
        vanished_classes=tuple(c for c in contract.classes if c not in seen),
    )


def reference_sample(quantiles: Sequence[float], n: int = 2001) -> np.ndarray:
    """(n,) values spread like the reference: its quantile function, interpolated linearly."""
    return np.interp(np.linspace(0.0, 1.0, n), QUANTILES, np.asarray(quantiles, dtype=np.float64))


def ks_test(values: np.ndarray, quantiles: Sequence[float], reference_n: int) -> tuple[float, float]:
    """(KS statistic, asymptotic two-sample p-value) of ``values`` against the reference distribution.

    The statistic is the largest gap between the empirical CDF of ``values`` and the reference CDF
    (read from its quantiles); the p-value counts the reference as ``reference_n`` images (the size of
    the version it was inferred from), so a small reference does not look more certain than it was."""
    from scipy import stats

    values = np.sort(values[np.isfinite(values)])
    if values.size == 0:
        return 0.0, 1.0
    ref = reference_sample(quantiles)
    d = float(stats.ks_2samp(values, ref).statistic)
    n, m = values.size, max(reference_n, 1)
    effective = math.sqrt(n * m / (n + m))
    return d, float(stats.kstwobign.sf(effective * d)) if d > 0 else 1.0


def psi(values: np.ndarray, quantiles: Sequence[float]) -> float:
    """Population stability index of ``values`` over the reference's deciles (equal-mass bins; tied
    edges merged), sum of (observed - expected) x ln(observed / expected)."""
    ref = reference_sample(quantiles)
    edges = np.unique(np.quantile(ref, np.linspace(0.1, 0.9, 9)))
    expected = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / ref.size
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    observed = counts / max(values.size, 1)
    e, o = np.clip(expected, 1e-4, None), np.clip(observed, 1e-4, None)
    return float(np.sum((o - e) * np.log(o / e)))


def _distribution_row(
    name: str, column: pd.Series, quantiles: Sequence[float], reference_n: int, checks: ContractChecks
) -> dict[str, Any]:
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    d, p = ks_test(values, quantiles, reference_n)
    index = psi(values, quantiles)
    shifted = p < checks.alpha and (d >= checks.min_ks_statistic or index >= checks.max_psi)
    median = float(np.median(values)) if values.size else None
    return {"feature": name, "kind": "distribution (KS, PSI)", "statistic": d, "p_value": p, "psi": index,
            "reference": f"median {_round(quantiles[10])}", "observed": f"median {_maybe(median)}",
            "shifted": bool(shifted)}  # fmt: skip


def _categorical_row(
    name: str, observed: pd.Series, reference: Mapping[str, float], checks: ContractChecks
) -> dict[str, Any]:
    shares = observed.value_counts(normalize=True)
    keys = set(reference) | {str(k) for k in shares.index}
    tv = 0.5 * sum(abs(float(shares.get(k, 0.0)) - float(reference.get(k, 0.0))) for k in keys)
    return {"feature": name, "kind": "shares (total variation)", "statistic": tv, "p_value": None,
            "psi": None, "reference": _share_text(reference),
            "observed": _share_text({str(k): float(v) for k, v in shares.items()}),
            "shifted": bool(tv > checks.max_share_change)}  # fmt: skip


_VARIANCE_FLOOR = 1e-4
"""Added to the diagonal of the reference covariance: a standard deviation of at least 0.01 (the
features are O(1): brightness, contrast, log blur, log pixels)."""


def _embedding_row(
    x: np.ndarray, ref: EmbeddingSummary, reference_n: int, checks: ContractChecks
) -> dict[str, Any]:
    """Mean shift of the cheap features in reference standard deviations (Mahalanobis), with a
    chi-square p-value of n m / (n + m) x distance^2 (Hotelling's two-sample statistic with the
    reference covariance taken as known; m: the reference's image count)."""
    from scipy import stats

    mean, cov = np.asarray(ref.mean), np.asarray(ref.cov)
    cov = cov + np.eye(len(mean)) * _VARIANCE_FLOOR  # a constant feature (one image size) stays invertible
    diff = x.mean(axis=0) - mean
    distance = float(math.sqrt(max(float(diff @ np.linalg.pinv(cov) @ diff), 0.0)))
    n, m = len(x), max(reference_n, 1)
    p = float(stats.chi2.sf(n * m / (n + m) * distance**2, df=len(mean)))
    shifted = p < checks.alpha and distance >= checks.min_embedding_shift
    return {"feature": "embedding", "kind": f"mean shift of {', '.join(ref.features)} (Mahalanobis)",
            "statistic": distance, "p_value": p, "psi": None, "reference": "mean of the reference",
            "observed": f"{distance:.3g} reference SDs away", "shifted": bool(shifted)}  # fmt: skip


def _share_table(labels: pd.Series, contract: DataContract) -> pd.DataFrame:
    total = max(len(labels), 1)
    counts = labels.value_counts()
    names = list(contract.classes) + sorted(set(counts.index) - set(contract.classes))
    rows = []
    for c in names:
        ref = float(contract.class_shares.get(c, 0.0))
        share = float(counts.get(c, 0)) / total
        rows.append({"label": c, "reference_share": ref, "share": share, "change": abs(share - ref)})
    return pd.DataFrame(rows, columns=list(SHARE_COLUMNS)).astype(
        {"reference_share": "float64", "share": "float64", "change": "float64"}
    )


def _share_text(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in sorted(shares.items()))


def _maybe(x: float | None) -> str:
    return "?" if x is None else f"{_round(x)}"


# --------------------------------------------------------------------------- report


def comparison_record(
    comparison: ContractComparison | None, contract: DataContract | None, path: Path
) -> dict[str, Any]:
    """The validation report's ``contract`` entry: ``status`` ``checked`` (with every property's test
    and every class's share) or ``written`` (this version is the reference now)."""
    if comparison is None or contract is None:
        return {"status": "written", "path": str(path)}
    features = comparison.features.astype(object).where(comparison.features.notna(), None)
    return {
        "status": "checked",
        "path": str(path),
        "inferred_from": dict(contract.inferred_from),
        "features": features.to_dict("records"),
        "shares": comparison.shares.to_dict("records"),
        "new_classes": list(comparison.new_classes),
        "vanished_classes": list(comparison.vanished_classes),
    }


def contract_section(entry: Mapping[str, Any] | None) -> Any:
    """The validation report's "Data contract" section (report kit), or None without a contract."""
    from components.core import report as kit

    if entry is None:
        return None
    if entry.get("status") == "not written":
        return kit.section("Data contract", kit.note(f"{entry['path']}: not written, {entry['reason']}."))
    if entry.get("status") == "written":
        return kit.section("Data contract", kit.paragraph(
            f"This data version is the reference now: wrote {entry['path']}. Review it, edit it and commit it; "
            "later versions are validated against it."
        ))  # fmt: skip
    shifted = [f["feature"] for f in entry["features"] if f["shifted"]]
    verdict = kit.badge(
        "shifted: " + ", ".join(shifted) if shifted else "no shift", "fail" if shifted else "pass"
    )
    rows = [[f["feature"], f["kind"], kit.num(f["statistic"], 3), _p_text(f["p_value"]), kit.num(f["psi"], 3),
             f["reference"], f["observed"], "yes" if f["shifted"] else "no"] for f in entry["features"]]  # fmt: skip
    shares = [[s["label"], f"{s['reference_share']:.1%}", f"{s['share']:.1%}", f"{s['change']:.1%}"]
              for s in entry["shares"]]  # fmt: skip
    origin = entry.get("inferred_from") or {}
    return kit.section(
        "Data contract",
        verdict,
        kit.paragraph(
            f"Checked against {entry['path']} (inferred from data version "
            f"{origin.get('data_version', '?')}, {origin.get('images', '?')} images)."
        ),  # fmt: skip
        kit.table(
            ["property", "test", "statistic", "p-value", "PSI", "reference", "this version", "shifted"], rows
        ),
        kit.table(["class", "contract share", "share", "change"], shares, compact=True),
    )


def _p_text(p: float | None) -> str:
    return "" if p is None else f"{p:.2g}"
