"""Zero-shot and linear-probe CLIP baselines (open_clip): the floor every trained model must beat.

The only module that imports open_clip (lazily, inside functions: importing this module is cheap,
so the gate and the result readers cost nothing to the stages that only need those).

* :func:`create_clip` builds an open_clip model with its own preprocessing and tokenizer from
  ``baseline.model`` / ``baseline.pretrained``: a pretrained tag (downloaded from the hub when
  online, read from the hub cache offline), a local checkpoint file, or ``local-dir:<folder>``.
  When no weights can be had it raises :class:`WeightsUnavailableError`; the stage turns that
  into a *skipped* baseline, never a crash and never a silently passed gate.
* Zero-shot: class names -> prompts from a template ensemble (open_clip's 80 OpenAI ImageNet
  templates, its 7-template subset, or a user file), with per-class display names and prompt
  overrides; each class's text embedding is the renormalised mean of its normalised prompt
  embeddings; logits are the model's own ``logit_scale`` times cosine similarity.
* Linear probe: logistic regression on frozen, L2-normalised image features (the CLIP paper's
  second baseline), its ``C`` picked on the validation split.
* Image features go through :class:`components.baseline.embeddings.EmbeddingCache`: each image is encoded
  once per (model, weights).
* Metrics are :func:`components.task.metrics.compute_metrics` dicts, the same as the trained model's.
* Multi-label data (``task="multilabel"``): zero-shot scores each label on its own, a sigmoid of
  ``logit_scale * (cos(image, label text) - the image's mean cos over all labels)`` (the per-image
  centring is what the softmax ignores anyway; it removes each image's overall similarity offset so
  one threshold per label fits every image), with per-label thresholds tuned on the val split
  (:func:`components.task.multilabel.tune_thresholds`, best F1); the linear probe is one logistic
  regression per label (one-vs-rest) on the frozen features, ``C`` picked by val mAP, thresholds
  tuned on val the same way. Metrics are :func:`components.task.multilabel.multilabel_metrics` dicts
  (mAP, micro/macro F1, subset accuracy, Hamming loss, per label AP / P / R / F1 / threshold).
  Disagreements are labels CLIP contradicts confidently: given but scored absent (``extra_labels``)
  or not given but scored present (``missing_labels``). Confidence is a calibrated probability of
  presence: Platt scaling of the zero-shot logits fitted on val (one slope shared by all labels,
  one intercept per label, :func:`fit_label_calibration`); the raw sigmoid of a logit-scaled
  similarity is far too sure of itself to say "confidently".

Files written by :func:`write_baseline` (``outputs/baseline/``):

==================  =========================================================================
baseline.json       the record: status (``ok`` / ``skipped`` / ``disabled``), reason, model,
                    weights, ``zero_shot`` and ``linear_probe`` (full metric dicts or null)
metrics.json        scalars for ``dvc metrics show``: ``zero_shot_<metric>``, ``linear_probe_<metric>``
per_class.csv       class, support, zero_shot_recall/f1, linear_probe_recall/f1
disagreements.csv   images whose label CLIP confidently disagrees with (label-quality signal)
==================  =========================================================================

Multi-label records add ``task: multilabel``; ``zero_shot`` / ``linear_probe`` are
``multilabel_metrics`` dicts (``mAP``, ``micro_f1``, ``macro_f1``, ``subset_accuracy``,
``hamming_loss``, ``per_label`` rows with ``ap`` / ``precision`` / ``recall`` / ``f1`` /
``threshold``, ...); ``zero_shot_thresholds`` and ``linear_probe_thresholds`` (label -> threshold,
tuned on val), ``threshold_split`` and ``threshold_images`` (where and on how many images),
``zero_shot_scoring`` (the formula), ``zero_shot_calibration`` (``slope`` and per-label
``intercepts`` of the disagreements' Platt scaling, or null without val labels), ``linear_probe_val_map``. metrics.json holds
``zero_shot_mAP``, ``zero_shot_micro_f1``, ``zero_shot_ap_<label>``, ... (see
:func:`components.task.metrics.flat_metrics`); per_class.csv has class, support, ``<kind>_ap``,
``<kind>_f1``, ``<kind>_threshold``; disagreements.csv has ``label`` / ``clip_label`` as ``|``-joined
sets plus ``missing_labels`` and ``extra_labels``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.baseline.embeddings import EmbeddingCache
from components.core.errors import ConfigError, DataError, DataUnavailableError
from components.data.manifest import file_digest
from components.evaluate.gates import GateResult
from components.task.metrics import compute_metrics, flat_metrics

if TYPE_CHECKING:
    import torch

    from components.core.config import BaselineConfig

logger = logging.getLogger(__name__)

TEMPLATE_SETS = ("imagenet80", "short")
KINDS = ("zero_shot", "linear_probe")
WEIGHTS_UNAVAILABLE = "skipped: weights unavailable"
NOT_APPLICABLE = "not applicable"
ZERO_SHOT_GATE = "beats_zero_shot"
DISAGREEMENT_COLUMNS = ("image_id", "split", "label", "clip_label", "confidence", "label_probability")
MULTILABEL_DISAGREEMENT_COLUMNS = (*DISAGREEMENT_COLUMNS, "missing_labels", "extra_labels")
MULTILABEL = "multilabel"
ZERO_SHOT_SCORING = "sigmoid(logit_scale * (cos(image, label) - mean cos(image, every label)))"
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_ENCODE_CHUNK = 2048  # images encoded between cache writes: a crash keeps the finished chunks


class WeightsUnavailableError(DataUnavailableError):
    """No CLIP weights can be had (offline and not cached, or none configured): skip the baseline."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ClipEncoder:
    """An open_clip model in eval mode with its preprocessing, tokenizer and embedding-cache key."""

    model: Any
    preprocess: Callable[[Any], Any]
    """PIL image -> (3, H, W) tensor, from the model's own preprocess config."""
    tokenizer: Callable[[list[str]], Any]
    model_name: str
    weights: str
    """The pretrained tag, checkpoint path, or ``random`` (benchmarks only)."""
    key: str
    """Embedding-cache key: model and weights (a file's sha256, not its path)."""
    device: torch.device

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature parameter (100 for OpenAI's CLIP)."""
        return float(self.model.logit_scale.detach().exp().item())


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("baseline.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return device


def create_clip(
    model: str,
    pretrained: str | None,
    *,
    cache_dir: Path | None = None,
    device: str = "cpu",
    random_init: bool = False,
) -> ClipEncoder:
    """An open_clip model for ``model`` (a name from ``open_clip.list_models()``, ``local-dir:<folder>``
    or ``hf-hub:<repo>``) with weights ``pretrained`` (a tag of that model, or a checkpoint file).

    Raises WeightsUnavailableError when the weights cannot be had (offline, nothing cached, none
    configured); ConfigError for an unknown model, tag or missing file. ``random_init=True``
    (benchmarks) builds the architecture with random weights and needs none.
    """
    import open_clip
    import torch

    if random_init:
        weights, key, label = None, f"{model}/random", "random"
    else:
        weights, key, label = _resolve_weights(model, pretrained, cache_dir=cache_dir)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=weights, device=device, cache_dir=str(cache_dir) if cache_dir else None
        )
        tokenizer = open_clip.get_tokenizer(model)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        raise DataError(f"cannot load the CLIP model {model!r} with weights {weights!r}: {e}") from e
    net.eval()
    logger.info("CLIP model %s, weights %s, on %s", model, label, device)
    return ClipEncoder(
        model=net,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_name=model,
        weights=label,
        key=key,
        device=torch.device(device),
    )


def _resolve_weights(
    model: str, pretrained: str | None, *, cache_dir: Path | None
) -> tuple[str | None, str, str]:
    """(the ``pretrained`` argument for open_clip, the cache key, what to call the weights); fetches
    a tag's weights first so that missing weights are told apart from every other failure."""
    import open_clip

    if model.startswith("local-dir:"):
        return None, *_local_dir_key(Path(model.removeprefix("local-dir:")))
    if model.startswith("hf-hub:"):
        try:
            open_clip.pretrained.download_pretrained_from_hf(
                model.removeprefix("hf-hub:"), cache_dir=str(cache_dir) if cache_dir else None
            )
        except Exception as e:  # any hub/cache failure means the same thing here: no weights
            logger.debug("fetching %s failed: %s", model, e)
            raise WeightsUnavailableError(
                f"{model} is not in the local hub cache and could not be downloaded (offline?)"
            ) from e
        return None, model, model
    if model not in open_clip.list_models():
        raise ConfigError(
            f"baseline.model {model!r} is not an open_clip model; see open_clip.list_models() "
            "(e.g. ViT-B-32), or use local-dir:<folder> / hf-hub:<repo>"
        )
    if not pretrained:
        raise WeightsUnavailableError(f"baseline.pretrained is empty: no weights configured for {model}")
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if cfg:
        if cfg.get("hf_hub") and not _in_hub_cache(cfg["hf_hub"], cache_dir) and _hub_unreachable():
            raise WeightsUnavailableError(
                f"{model}/{pretrained} is not in the local hub cache and the hub cannot be reached; "
                "run once online, or set baseline.pretrained to a checkpoint file"
            )
        try:
            open_clip.pretrained.download_pretrained(cfg, cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as e:  # offline (HF_HUB_OFFLINE, no network) and not in the cache
            logger.debug("fetching %s/%s failed: %s", model, pretrained, e)
            raise WeightsUnavailableError(
                f"{model}/{pretrained} is not in the local hub cache and could not be downloaded "
                "(offline?); run once online, or set baseline.pretrained to a checkpoint file"
            ) from e
        return pretrained, f"{model}/{pretrained}", pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), f"{model}/sha256:{_file_sha256(path)}", str(path)
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
    raise ConfigError(
        f"baseline.pretrained {pretrained!r} is neither a pretrained tag of {model} ({tags}) "
        "nor an existing checkpoint file"
    )


def _in_hub_cache(hf_hub: str, cache_dir: Path | None) -> bool:
    """Whether open_clip's file for an ``org/repo/[file]`` hub entry is in the local hub cache."""
    import os

    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hf_hub)  # open_clip's convention: a trailing "/" means its default file
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    names += [n.rsplit(".", 1)[0] + ".safetensors" for n in names if n.endswith((".bin", ".pth"))]
    cache = str(cache_dir) if cache_dir else None
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache), str) for n in names)


def _hub_unreachable(timeout_s: float = 3.0) -> bool:
    """True when downloads are allowed but the hub's host does not answer: huggingface_hub would
    retry for about a minute before failing, and an offline pipeline must skip in seconds."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")
    ):
        return False  # offline mode fails fast by itself; behind a proxy a direct probe proves nothing
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s
        ).close()
    except OSError:
        return True
    return False


def _local_dir_key(folder: Path) -> tuple[str, str]:
    """(cache key, checkpoint file) of a ``local-dir:`` folder: open_clip_config.json and the
    checkpoints both go into the key."""
    if not (folder / "open_clip_config.json").is_file():
        raise ConfigError(f"baseline.model local-dir:{folder}: no open_clip_config.json in that folder")
    checkpoints = sorted(p for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    if not checkpoints:
        raise WeightsUnavailableError(f"local-dir:{folder} holds no checkpoint file")
    digest = hashlib.sha256()
    for p in [folder / "open_clip_config.json", *checkpoints]:
        digest.update(_file_sha256(p).encode())
    return f"local-dir/sha256:{digest.hexdigest()[:16]}", str(checkpoints[0])


def _file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


# --------------------------------------------------------------------------- prompts and text


def resolve_templates(spec: str) -> tuple[str, ...]:
    """Prompt templates with ``{}`` for the class name.

    spec: ``imagenet80`` (open_clip's 80 OpenAI ImageNet templates), ``short`` (its 7-template
    subset), or a text file, one template per line (blank lines and ``#`` comments skipped).
    """
    if spec in TEMPLATE_SETS:
        from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        chosen = OPENAI_IMAGENET_TEMPLATES if spec == "imagenet80" else SIMPLE_IMAGENET_TEMPLATES
        return tuple(t("{}") for t in chosen)  # open_clip's templates are lambdas of the class name
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"baseline.templates {spec!r} is neither {' nor '.join(TEMPLATE_SETS)} nor an existing file"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(
            f"template file {path}: every line needs {{}} where the class name goes"
            + (f" (e.g. 'a photo of a {{}}.'); bad line: {bad[0]!r}" if bad else "; the file has none")
        )
    return templates


def class_prompts(
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    names: Mapping[str, str] | None = None,
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """The prompts of each class, in class order.

    Each template's ``{}`` is filled with the class's display name (``names[c]``, else the class
    with ``_`` as spaces). ``overrides[c]`` replaces the templates for class c (its prompts may use
    ``{}`` too). A key that is not a class is an error: a typo must not silently do nothing.
    """
    names, overrides = dict(names or {}), dict(overrides or {})
    for what, mapping in (("class_names", names), ("class_prompts", overrides)):
        unknown = sorted(set(mapping) - set(classes))
        if unknown:
            raise ConfigError(f"baseline.{what} names classes not in the dataset: {unknown}")
    empty = sorted(c for c, ps in overrides.items() if not ps)
    if empty:
        raise ConfigError(f"baseline.class_prompts gives no prompts for {empty}")
    out = []
    for c in classes:
        display = names.get(c, c.replace("_", " "))
        out.append([t.replace("{}", display) for t in overrides.get(c, templates)])
    return out


def build_text_classifier(
    encoder: ClipEncoder, prompts: Sequence[Sequence[str]], *, batch_size: int = 256
) -> np.ndarray:
    """Zero-shot weights (K, D): per class, the mean of its normalised prompt embeddings, renormalised."""
    import torch

    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([k for k, ps in enumerate(prompts) for _ in ps], device=encoder.device)
    with torch.inference_mode():
        emb = torch.cat(
            [
                encoder.model.encode_text(
                    encoder.tokenizer(flat[i : i + batch_size]).to(encoder.device), normalize=True
                )
                for i in range(0, len(flat), batch_size)
            ]
        ).float()
        sums = torch.zeros(len(prompts), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        weights = torch.nn.functional.normalize(sums, dim=1)  # the mean's direction = the sum's
    return weights.cpu().numpy()


# --------------------------------------------------------------------------- images


def encode_image_batches(encoder: ClipEncoder, batches: Iterable[Any]) -> np.ndarray:
    """Image features (N, D) float32, unnormalised, of image batches ((B, 3, H, W) tensors, or
    (tensor, target) pairs from a DataLoader). One forward per batch; results stay on the device
    until the end, so the loop does no per-image Python work and no per-batch device sync."""
    import torch

    out = []
    with torch.inference_mode():
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            out.append(encoder.model.encode_image(x.to(encoder.device, non_blocking=True)))
        if not out:
            return np.zeros((0, 0), np.float32)
        return torch.cat(out).float().cpu().numpy()


def embed_images(
    encoder: ClipEncoder,
    image_ids: Sequence[str],
    paths: Sequence[Path],
    *,
    cache: EmbeddingCache | None,
    batch_size: int = 64,
    workers: int = 0,
) -> tuple[np.ndarray, int]:
    """(features (N, D) in ``image_ids`` order, how many images were encoded now).

    Only images the cache lacks are decoded and encoded (in chunks, each appended to the cache as
    soon as it is done). Without a cache every distinct image is encoded.
    """
    from torch.utils.data import DataLoader

    from components.data.datasets import ManifestDataset

    cache = cache if cache is not None else _MemoryCache()
    path_of = dict(zip(image_ids, paths, strict=True))
    todo = cache.missing(image_ids)
    for start in range(0, len(todo), _ENCODE_CHUNK):
        chunk = todo[start : start + _ENCODE_CHUNK]
        ds = ManifestDataset(
            [path_of[i] for i in chunk], [0] * len(chunk), transform=encoder.preprocess, mode="RGB"
        )
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
        cache.put(chunk, encode_image_batches(encoder, loader))
        logger.info("encoded %d / %d images with %s", start + len(chunk), len(todo), encoder.key)
    return cache.get(image_ids), len(todo)


class _MemoryCache(EmbeddingCache):
    """The cache interface without a disk (``embed_images(cache=None)``)."""

    def __init__(self) -> None:
        self.key, self._index, self._parts = "memory", {}, []

    def put(self, image_ids: Sequence[str], features: np.ndarray) -> None:
        index = self._load()
        part = len(self._parts)
        self._parts.append(np.asarray(features, np.float32))
        index.update({str(i): (part, row) for row, i in enumerate(image_ids)})


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; x: (N, D)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def zero_shot_probs(image_features: np.ndarray, text_weights: np.ndarray, logit_scale: float) -> np.ndarray:
    """Class probabilities (N, K): softmax of ``logit_scale * cos(image (N, D), class text (K, D))``."""
    logits = logit_scale * normalize(image_features.astype(np.float64)) @ text_weights.astype(np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def zero_shot_label_logits(
    image_features: np.ndarray, text_weights: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Per-label logits (N, K) for multi-label data: ``logit_scale * (cos - the image's mean cos over
    the K labels)``."""
    cos = normalize(image_features.astype(np.float64)) @ text_weights.astype(np.float64).T
    return logit_scale * (cos - cos.mean(axis=1, keepdims=True))


def zero_shot_label_probs(
    image_features: np.ndarray, text_weights: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Per-label probabilities (N, K): the sigmoid of :func:`zero_shot_label_logits`; rows need not
    sum to 1."""
    return _sigmoid(zero_shot_label_logits(image_features, text_weights, logit_scale))


@dataclass(frozen=True)
class LabelCalibration:
    """Platt scaling of per-label logits: ``sigmoid(slope * logit + intercepts[label])``."""

    slope: float
    intercepts: tuple[float, ...]

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(N, K) logits -> (N, K) calibrated probabilities of presence."""
        return _sigmoid(self.slope * logits + np.asarray(self.intercepts)[None, :])


def fit_label_calibration(logits: np.ndarray, y: np.ndarray) -> LabelCalibration | None:
    """Fit :class:`LabelCalibration` on validation logits (N, K) and 0/1 labels (N, K): one logistic
    regression over every (image, label) pair, the logit as the shared feature and a one-hot label
    as the per-label intercept (L2-regularised, so a label with few val positives stays near the
    rest). None when there is nothing to fit (no val images, or no label both present and absent)."""
    from sklearn.linear_model import LogisticRegression

    n, k = logits.shape
    if n == 0 or y.min() == y.max():
        return None
    x = np.zeros((n * k, k + 1))
    x[:, 0] = logits.ravel()
    x[np.arange(n * k), 1 + np.tile(np.arange(k), n)] = 1.0
    model = LogisticRegression(C=1.0, fit_intercept=False, max_iter=1000).fit(x, np.asarray(y).ravel())
    coef = model.coef_[0]
    return LabelCalibration(slope=float(coef[0]), intercepts=tuple(float(c) for c in coef[1:]))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


# --------------------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class LinearProbe:
    model: Any
    """sklearn pipeline: StandardScaler -> LogisticRegression, on L2-normalised features."""
    C: float
    val_accuracy: float | None
    """Accuracy on the validation split at the chosen C (None: no validation images)."""

    def predict_proba(self, features: np.ndarray, n_classes: int) -> np.ndarray:
        """(N, K) probabilities; classes never seen in training get probability 0."""
        probs = np.zeros((features.shape[0], n_classes))
        probs[:, self.model.classes_] = self.model.predict_proba(normalize(features))
        return probs


def fit_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    C: float | None = None,
    max_iter: int = 1000,
) -> LinearProbe:
    """Logistic regression on frozen features x (N, D) with labels y (N,).

    ``C`` None: the best of :data:`PROBE_C_GRID` by validation accuracy (1.0 without validation
    images); the CLIP paper sweeps C the same way.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise DataError("the linear probe needs training images of at least 2 classes")

    def fit(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter)).fit(
            normalize(x_train), y_train
        )

    if x_val is None or y_val is None or len(y_val) == 0:
        c = 1.0 if C is None else C
        logger.info("linear probe: C=%g (no validation images)", c)
        return LinearProbe(model=fit(c), C=c, val_accuracy=None)
    model, c, acc = _sweep_c(fit, lambda m: float((m.predict(normalize(x_val)) == y_val).mean()), C)
    logger.info("linear probe: C=%g (val accuracy %.4f)", c, acc)
    return LinearProbe(model=model, C=c, val_accuracy=acc)


def _sweep_c(
    fit: Callable[[float], Any], score: Callable[[Any], float], C: float | None
) -> tuple[Any, float, float]:
    """(model, C, val score) of the best C in :data:`PROBE_C_GRID` (or just ``C``); ties go to the
    stronger regularisation (the smaller C)."""
    scored = [(score(model), -c, model) for c in (PROBE_C_GRID if C is None else (C,)) for model in (fit(c),)]
    value, neg_c, model = max(scored, key=lambda t: t[:2])
    return model, -neg_c, value


@dataclass(frozen=True)
class MultilabelProbe:
    models: tuple[Any, ...]
    """Per label: a StandardScaler -> LogisticRegression pipeline, or the constant probability of a
    label that is always (or never) there in the training images."""
    C: float
    val_map: float | None
    """Mean AP on the validation split at the chosen C (None: no validation images with labels)."""

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) per-label probabilities."""
        x = normalize(features)
        return np.stack(
            [
                m.predict_proba(x)[:, 1] if hasattr(m, "predict_proba") else np.full(len(x), float(m))
                for m in self.models
            ],
            axis=1,
        )


def fit_multilabel_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    C: float | None = None,
    max_iter: int = 1000,
) -> MultilabelProbe:
    """One-vs-rest logistic regressions on frozen features x (N, D) with 0/1 labels y (N, K).

    ``C`` None: the best of :data:`PROBE_C_GRID` by validation mAP (1.0 without validation labels).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from components.task.multilabel import mean_average_precision

    if not (y_train.any(axis=0) & ~y_train.all(axis=0)).any():
        raise DataError("the linear probe needs training images with and without some label")
    xn = normalize(x_train)

    def fit(c: float) -> MultilabelProbe:
        models: list[Any] = []
        for k in range(y_train.shape[1]):
            target = y_train[:, k]
            if target.min() == target.max():
                models.append(float(target[0]))
                continue
            pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
            models.append(pipe.fit(xn, target))
        return MultilabelProbe(models=tuple(models), C=c, val_map=None)

    if x_val is None or y_val is None or not np.asarray(y_val).any():
        c = 1.0 if C is None else C
        logger.info("multi-label linear probe: C=%g (no validation labels)", c)
        return fit(c)
    best, c, val_map = _sweep_c(
        fit, lambda p: float(mean_average_precision(y_val, p.predict_proba(x_val))), C
    )
    logger.info("multi-label linear probe: C=%g (val mAP %.4f)", c, val_map)
    return MultilabelProbe(models=best.models, C=c, val_map=val_map)


# --------------------------------------------------------------------------- the stage's work


def _sample(rows: pd.DataFrame, max_per_class: int | None) -> pd.DataFrame:
    """The first ``max_per_class`` rows of each label (manifest order: by image_id, i.e. a hash)."""
    if max_per_class is None:
        return rows
    return rows.groupby("label", sort=False).head(max_per_class)


def run_baselines(
    encoder: ClipEncoder,
    manifest: pd.DataFrame,
    classes: Sequence[str],
    *,
    data_dir: Path,
    cache: EmbeddingCache | None,
    cfg: BaselineConfig,
    task: str = "singlelabel",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Zero-shot and linear-probe metrics on ``cfg.eval_split``, and the disagreement table.

    Returns (the record written as baseline.json, disagreements with :data:`DISAGREEMENT_COLUMNS`;
    for ``task="multilabel"`` see :func:`run_multilabel_baselines`).
    """
    from components.data.datasets import encode_labels, split_rows

    if task == MULTILABEL:
        return run_multilabel_baselines(encoder, manifest, classes, data_dir=data_dir, cache=cache, cfg=cfg)
    by_split = {s: manifest[manifest["split"] == s] for s in ("train", "val")}
    parts = [_sample(split_rows(manifest, cfg.eval_split), cfg.eval_max_per_class).assign(_role="eval")]
    if cfg.probe:
        parts += [_sample(by_split[s], cfg.probe_max_per_class).assign(_role=s) for s in ("train", "val")]
    rows = pd.concat(parts, ignore_index=True)
    feats, encoded = embed_images(
        encoder,
        rows["image_id"].tolist(),
        [data_dir / p for p in rows["path"]],
        cache=cache,
        batch_size=cfg.batch_size,
        workers=cfg.loader_workers,
    )
    y = np.asarray(encode_labels(rows["label"].tolist(), classes))
    prompts = class_prompts(
        classes, resolve_templates(cfg.templates), names=cfg.class_names, overrides=cfg.class_prompts
    )
    probs = zero_shot_probs(feats, build_text_classifier(encoder, prompts), encoder.logit_scale)
    is_eval = (rows["_role"] == "eval").to_numpy()
    record: dict[str, Any] = {
        "status": "ok",
        "reason": "",
        "model": encoder.model_name,
        "pretrained": encoder.weights,
        "embedding_key": encoder.key,
        "logit_scale": encoder.logit_scale,
        "templates": cfg.templates,
        "prompts_per_class": {c: len(p) for c, p in zip(classes, prompts, strict=True)},
        "example_prompt": {c: p[0] for c, p in zip(classes, prompts, strict=True)},
        "eval_split": cfg.eval_split,
        "embeddings": {
            "images": len(rows),
            "encoded": encoded,
            "cached": rows["image_id"].nunique() - encoded,
        },
        "zero_shot": compute_metrics(y[is_eval], probs[is_eval], classes),
        "linear_probe": None,
        "linear_probe_C": None,
    }
    if cfg.probe:
        record.update(_probe(feats, y, rows["_role"].to_numpy(), classes, C=cfg.probe_C))
    disagreements = find_disagreements(
        rows.drop_duplicates("image_id"), probs[~rows.duplicated("image_id").to_numpy()], classes,
        min_confidence=cfg.disagreement_min_confidence,
    )  # fmt: skip
    record["disagreements"] = len(disagreements)
    return record, disagreements


def run_multilabel_baselines(
    encoder: ClipEncoder,
    manifest: pd.DataFrame,
    classes: Sequence[str],
    *,
    data_dir: Path,
    cache: EmbeddingCache | None,
    cfg: BaselineConfig,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Multi-label zero-shot and linear-probe metrics on ``cfg.eval_split`` (thresholds tuned on val;
    see the module doc), and the disagreements (:data:`MULTILABEL_DISAGREEMENT_COLUMNS`)."""
    from components.data.datasets import encode_label_sets, split_rows

    val = manifest[manifest["split"] == "val"]
    parts = [_sample(split_rows(manifest, cfg.eval_split), cfg.eval_max_per_class).assign(_role="eval")]
    parts.append(
        _sample(val, cfg.probe_max_per_class).assign(_role="val")
    )  # thresholds, even without a probe
    if cfg.probe:
        parts.append(
            _sample(manifest[manifest["split"] == "train"], cfg.probe_max_per_class).assign(_role="train")
        )
    rows = pd.concat(parts, ignore_index=True)
    feats, encoded = embed_images(
        encoder,
        rows["image_id"].tolist(),
        [data_dir / p for p in rows["path"]],
        cache=cache,
        batch_size=cfg.batch_size,
        workers=cfg.loader_workers,
    )
    y = encode_label_sets([_label_list(v) for v in rows["labels"]], classes)
    prompts = class_prompts(
        classes, resolve_templates(cfg.templates), names=cfg.class_names, overrides=cfg.class_prompts
    )
    logits = zero_shot_label_logits(feats, build_text_classifier(encoder, prompts), encoder.logit_scale)
    probs = _sigmoid(logits)
    role = rows["_role"].to_numpy()
    zero_shot, thresholds = _multilabel_result(y, probs, role, classes)
    calibration = fit_label_calibration(logits[role == "val"], y[role == "val"])
    record: dict[str, Any] = {
        "status": "ok",
        "reason": "",
        "task": MULTILABEL,
        "model": encoder.model_name,
        "pretrained": encoder.weights,
        "embedding_key": encoder.key,
        "logit_scale": encoder.logit_scale,
        "zero_shot_scoring": ZERO_SHOT_SCORING,
        "templates": cfg.templates,
        "prompts_per_class": {c: len(p) for c, p in zip(classes, prompts, strict=True)},
        "example_prompt": {c: p[0] for c, p in zip(classes, prompts, strict=True)},
        "eval_split": cfg.eval_split,
        "threshold_split": "val",
        "threshold_images": int((role == "val").sum()),
        "embeddings": {
            "images": len(rows),
            "encoded": encoded,
            "cached": rows["image_id"].nunique() - encoded,
        },
        "zero_shot": zero_shot,
        "zero_shot_thresholds": dict(zip(classes, thresholds, strict=True)),
        "zero_shot_calibration": _calibration_record(calibration, classes),
        "linear_probe": None,
        "linear_probe_C": None,
    }
    if cfg.probe:
        record.update(_multilabel_probe(feats, y, role, classes, C=cfg.probe_C))
    first = ~rows.duplicated("image_id").to_numpy()
    presence = calibration(logits[first]) if calibration is not None else probs[first]
    disagreements = find_multilabel_disagreements(
        rows[first], y[first], presence, classes, min_confidence=cfg.disagreement_min_confidence
    )
    record["disagreements"] = len(disagreements)
    return record, disagreements


def _calibration_record(cal: LabelCalibration | None, classes: Sequence[str]) -> dict[str, Any] | None:
    if cal is None:
        return None
    return {"slope": cal.slope, "intercepts": dict(zip(classes, cal.intercepts, strict=True))}


def _label_list(value: Any) -> list[str]:
    """A manifest ``labels`` cell (list, or numpy array from parquet) as a list of str."""
    return [] if value is None else [str(v) for v in value]


def _multilabel_result(
    y: np.ndarray, probs: np.ndarray, role: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, Any], list[float]]:
    """(multilabel_metrics on the eval rows with thresholds tuned on the val rows, the thresholds)."""
    from components.task.multilabel import multilabel_metrics, tune_thresholds

    val, ev = role == "val", role == "eval"
    thresholds = [t.threshold for t in tune_thresholds(y[val], probs[val], classes)]
    return multilabel_metrics(y[ev], probs[ev], thresholds, classes), thresholds


def _multilabel_probe(
    feats: np.ndarray, y: np.ndarray, role: np.ndarray, classes: Sequence[str], *, C: float | None
) -> dict[str, Any]:
    train, val = role == "train", role == "val"
    if not (y[train].any(axis=0) & ~y[train].all(axis=0)).any():
        logger.warning("linear probe skipped: no label both present and absent in the train split")
        return {"linear_probe_skipped": "no label both present and absent in the train split"}
    probe = fit_multilabel_probe(feats[train], y[train], x_val=feats[val], y_val=y[val], C=C)
    metrics, thresholds = _multilabel_result(y, probe.predict_proba(feats), role, classes)
    return {
        "linear_probe": metrics,
        "linear_probe_C": probe.C,
        "linear_probe_val_map": probe.val_map,
        "linear_probe_thresholds": dict(zip(classes, thresholds, strict=True)),
        "linear_probe_train_images": int(train.sum()),
    }


def find_multilabel_disagreements(
    rows: pd.DataFrame,
    y: np.ndarray,
    presence: np.ndarray,
    classes: Sequence[str],
    *,
    min_confidence: float,
) -> pd.DataFrame:
    """Images with a label CLIP contradicts with at least ``min_confidence``: a given label whose
    probability of presence is <= 1 - min_confidence (``extra_labels``) or a label not given whose
    probability is >= min_confidence (``missing_labels``). ``label`` is the given set, ``clip_label``
    the set with CLIP's corrections, ``confidence`` the most confident contradiction and
    ``label_probability`` = 1 - confidence (low = likely wrong, like the single-label table); most
    confident first. rows: manifest rows; y (0/1) and presence (calibrated probabilities): (N, K)
    in row order."""
    present = presence
    given = y.astype(bool)
    extra = given & (present <= 1 - min_confidence)
    missing = ~given & (present >= min_confidence)
    against = np.where(extra, 1 - present, 0.0) + np.where(missing, present, 0.0)
    keep = (extra | missing).any(axis=1)
    names = np.asarray(classes, dtype=object)

    def joined(mask: np.ndarray) -> list[str]:
        return ["|".join(names[m]) for m in mask[keep]]

    confidence = against.max(axis=1)[keep]
    out = pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy()[keep],
            "split": rows["split"].to_numpy()[keep],
            "label": joined(given),
            "clip_label": joined((given & ~extra) | missing),
            "confidence": confidence,
            "label_probability": 1 - confidence,
            "missing_labels": joined(missing),
            "extra_labels": joined(extra),
        },
        columns=list(MULTILABEL_DISAGREEMENT_COLUMNS),
    )
    return out.sort_values(["confidence", "image_id"], ascending=[False, True], ignore_index=True)


def _probe(
    feats: np.ndarray, y: np.ndarray, role: np.ndarray, classes: Sequence[str], *, C: float | None
) -> dict[str, Any]:
    train, val, ev = role == "train", role == "val", role == "eval"
    if len(np.unique(y[train])) < 2:
        logger.warning("linear probe skipped: fewer than 2 classes in the train split")
        return {"linear_probe_skipped": "fewer than 2 classes in the train split"}
    probe = fit_linear_probe(feats[train], y[train], x_val=feats[val], y_val=y[val], C=C)
    return {
        "linear_probe": compute_metrics(y[ev], probe.predict_proba(feats[ev], len(classes)), classes),
        "linear_probe_C": probe.C,
        "linear_probe_val_accuracy": probe.val_accuracy,
        "linear_probe_train_images": int(train.sum()),
    }


def find_disagreements(
    rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], *, min_confidence: float
) -> pd.DataFrame:
    """Images whose most probable class under CLIP is not their label, with probability >=
    ``min_confidence``; most confident first. rows: manifest rows (image_id, split, label);
    probs: (N, K) in the same order."""
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(top)), top]
    index = {c: i for i, c in enumerate(classes)}
    label_idx = rows["label"].map(index).to_numpy()
    keep = (top != label_idx) & (conf >= min_confidence)
    out = pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy()[keep],
            "split": rows["split"].to_numpy()[keep],
            "label": rows["label"].to_numpy()[keep],
            "clip_label": np.asarray(classes, dtype=object)[top[keep]],
            "confidence": conf[keep],
            "label_probability": probs[np.arange(len(top)), label_idx][keep],
        }
    )
    return out.sort_values(["confidence", "image_id"], ascending=[False, True], ignore_index=True)


# --------------------------------------------------------------------------- records and files


def skipped_record(
    reason: str, *, model: str, pretrained: str | None, status: str = "skipped"
) -> dict[str, Any]:
    """baseline.json of a baseline that did not run (``status`` skipped or disabled)."""
    return {
        "status": status,
        "reason": reason,
        "model": model,
        "pretrained": pretrained,
        "zero_shot": None,
        "linear_probe": None,
        "disagreements": 0,
    }


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """The small result a stage returns (CLI, Prefect): status, reason, accuracies, counts; for
    multi-label records ``task`` and ``<kind>_mAP`` / ``<kind>_micro_f1`` / ``<kind>_macro_f1``."""
    out = {k: record.get(k) for k in ("status", "reason", "model", "pretrained", "disagreements")}
    for kind in KINDS:
        out[f"{kind}_accuracy"] = (record.get(kind) or {}).get("accuracy")
    if record.get("task") == MULTILABEL:
        out["task"] = MULTILABEL
        for kind in KINDS:
            out |= {f"{kind}_{m}": (record.get(kind) or {}).get(m) for m in ("mAP", "micro_f1", "macro_f1")}
    if record.get("embeddings"):
        out["embeddings"] = record["embeddings"]
    return out


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for people (CLI, Prefect log) from :func:`summarize`'s result."""
    if summary["status"] != "ok":
        return str(summary["reason"])
    metric = "mAP" if summary.get("task") == MULTILABEL else "accuracy"
    zero_shot, probe = summary.get(f"zero_shot_{metric}"), summary.get(f"linear_probe_{metric}")
    return (
        f"{summary['model']}/{summary['pretrained']}: zero-shot {metric} "
        f"{'-' if zero_shot is None else f'{zero_shot:.4f}'}, linear probe "
        f"{'-' if probe is None else f'{probe:.4f}'}; {summary['disagreements']} confident label disagreements"
    )


def write_baseline(
    record: dict[str, Any], disagreements: pd.DataFrame | None, out_dir: Path
) -> dict[str, Path]:
    """Write baseline.json, metrics.json, per_class.csv, disagreements.csv (always all four, so DVC
    finds its outputs also when the baseline was skipped); returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Any] = {"available": record["status"] == "ok"}
    for kind in KINDS:
        if record.get(kind):
            flat.update({f"{kind}_{k}": v for k, v in flat_metrics(record[kind]).items()})
    paths = {
        "baseline": _write_json(record, out_dir / "baseline.json"),
        "metrics": _write_json(flat, out_dir / "metrics.json"),
        "per_class": _write_per_class(record, out_dir / "per_class.csv"),
        "disagreements": out_dir / "disagreements.csv",
    }
    columns = MULTILABEL_DISAGREEMENT_COLUMNS if record.get("task") == MULTILABEL else DISAGREEMENT_COLUMNS
    table = disagreements if disagreements is not None else pd.DataFrame(columns=list(columns))
    table.to_csv(paths["disagreements"], index=False, float_format="%.6f")
    return paths


def read_baseline(out_dir: Path) -> dict[str, Any] | None:
    """baseline.json of ``out_dir`` (``outputs/baseline``), or None when the stage has not run."""
    path = Path(out_dir) / "baseline.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(obj: Any, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
    return path


def _write_per_class(record: dict[str, Any], path: Path) -> Path:
    multilabel = record.get("task") == MULTILABEL
    metrics = ("ap", "f1", "threshold") if multilabel else ("recall", "f1")
    columns = ["class", "support"] + [f"{k}_{m}" for k in KINDS for m in metrics]
    rows: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        per = (record.get(kind) or {}).get("per_label" if multilabel else "per_class", [])
        for row in per:
            name = row["label" if multilabel else "class"]
            entry = rows.setdefault(name, {"class": name, "support": row["support"]})
            entry.update({f"{kind}_{m}": row[m] for m in metrics})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows.values())
    return path


# --------------------------------------------------------------------------- the optional gate


def check_beats_baseline(
    trained_metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None, *, margin: float = 0.0
) -> list[GateResult]:
    """Gates: the trained model's accuracy, and each class's recall, >= the zero-shot one + margin.

    trained_metrics: a compute_metrics dict. baseline_metrics: the zero-shot compute_metrics dict,
    or a whole baseline.json record, or None. When there is no zero-shot result (skipped: weights
    unavailable, disabled, not run) the result is one gate ``beats_zero_shot`` marked *not
    applicable* in its message and NOT passed: a gate that was not checked never passes.
    Multi-label metrics (``task: multilabel``): mAP overall and each label's AP instead.
    """
    if not 0.0 <= margin <= 1.0:
        raise ConfigError(f"the zero-shot gate margin must be within [0, 1], got {margin}")
    zero_shot, why = _zero_shot_of(baseline_metrics)
    multilabel = trained_metrics.get("task") == MULTILABEL
    headline = float(trained_metrics["mAP" if multilabel else "accuracy"] or 0.0)
    if zero_shot is not None and (zero_shot.get("task") == MULTILABEL) != multilabel:
        zero_shot, why = None, "is of another task (single-label vs multi-label) than the trained model"
    if zero_shot is None:
        message = f"{NOT_APPLICABLE}: baseline {why}; this gate was not checked"
        return [GateResult(ZERO_SHOT_GATE, False, headline, margin, message)]
    if multilabel:
        return _beats_per_label(trained_metrics, zero_shot, margin)
    gates = [
        _beats(
            f"{ZERO_SHOT_GATE}[accuracy]",
            "accuracy",
            trained_metrics["accuracy"],
            zero_shot["accuracy"],
            margin,
        )
    ]
    base_recall = {r["class"]: r["recall"] for r in zero_shot["per_class"]}
    for row in trained_metrics["per_class"]:
        cls = str(row["class"])
        if cls not in base_recall:
            msg = f"{NOT_APPLICABLE}: class '{cls}' has no zero-shot result; this gate was not checked"
            gates.append(GateResult(f"{ZERO_SHOT_GATE}[{cls}]", False, float(row["recall"]), margin, msg))
            continue
        gates.append(
            _beats(f"{ZERO_SHOT_GATE}[{cls}]", f"recall of '{cls}'", row["recall"], base_recall[cls], margin)
        )
    return gates


def _beats_per_label(
    trained: Mapping[str, Any], zero_shot: Mapping[str, Any], margin: float
) -> list[GateResult]:
    """Multi-label: trained mAP and each label's AP >= zero-shot's + margin; a label without an AP
    on either side (no positives) is not applicable and does not pass."""
    gates = [_beats(f"{ZERO_SHOT_GATE}[mAP]", "mAP", trained["mAP"] or 0.0, zero_shot["mAP"] or 0.0, margin)]
    base_ap = {r["label"]: r.get("ap") for r in zero_shot["per_label"]}
    for row in trained["per_label"]:
        label, ap = str(row["label"]), row.get("ap")
        if ap is None or base_ap.get(label) is None:
            msg = f"{NOT_APPLICABLE}: label '{label}' has no AP on one side (no positives); this gate was not checked"
            gates.append(GateResult(f"{ZERO_SHOT_GATE}[{label}]", False, float(ap or 0.0), margin, msg))
            continue
        gates.append(_beats(f"{ZERO_SHOT_GATE}[{label}]", f"AP of '{label}'", ap, base_ap[label], margin))
    return gates


def is_not_applicable(gate: GateResult) -> bool:
    """True for a baseline gate that could not be checked (see :func:`check_beats_baseline`)."""
    return gate.message.startswith(NOT_APPLICABLE)


def _zero_shot_of(baseline: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    if baseline is None:
        return None, "not run (no baseline.json)"
    if "status" in baseline:  # a baseline.json record
        if baseline.get("zero_shot"):
            return baseline["zero_shot"], ""
        reason = str(baseline.get("reason") or baseline["status"])  # e.g. "skipped: weights unavailable: ..."
        return None, reason if reason.startswith(
            str(baseline["status"])
        ) else f"{baseline['status']}: {reason}"
    return baseline, ""


def _beats(name: str, what: str, value: float, base: float, margin: float) -> GateResult:
    threshold = float(base) + margin
    passed = float(value) >= threshold - 1e-12
    message = f"{what} {float(value):.4f} {'>=' if passed else '<'} zero-shot {float(base):.4f}" + (
        f" + margin {margin:.4f}" if margin else ""
    )
    return GateResult(name=name, passed=passed, value=float(value), threshold=threshold, message=message)
