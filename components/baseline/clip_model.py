"""The open_clip adapter: the only module that imports open_clip (lazily, inside functions, so
importing the baseline package is cheap for the stages that only read its results).

* :func:`create_clip` builds an open_clip model with its own preprocessing and tokenizer from
  ``baseline.model`` / ``baseline.pretrained``: a pretrained tag (downloaded from the hub when
  online, read from the hub cache offline), a local checkpoint file, or ``local-dir:<folder>``.
  When no weights can be had it raises :class:`WeightsUnavailableError`; the stage turns that
  into a *skipped* baseline, never a crash and never a silently passed gate.
* Text: :func:`builtin_templates` (open_clip's prompt template sets) and
  :func:`build_text_classifier` (one text embedding per class from its prompts).
* Images: :func:`encode_image_batches` (one forward per batch) and :func:`embed_images`, which
  encodes only what the :class:`~components.baseline.embeddings.EmbeddingCache` lacks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.baseline.embeddings import EmbeddingCache, MemoryCache
from components.core.errors import ConfigError, DataError, DataUnavailableError
from components.data.manifest import file_digest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TEMPLATE_SETS = ("imagenet80", "short")
"""open_clip's template sets: its 80 OpenAI ImageNet templates, and its 7-template subset."""
WEIGHTS_UNAVAILABLE = "skipped: weights unavailable"
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
    behind_proxy: bool = False,
) -> ClipEncoder:
    """An open_clip model for ``model`` (a name from ``open_clip.list_models()``, ``local-dir:<folder>``
    or ``hf-hub:<repo>``) with weights ``pretrained`` (a tag of that model, or a checkpoint file).

    Raises WeightsUnavailableError when the weights cannot be had (offline, nothing cached, none
    configured); ConfigError for an unknown model, tag or missing file. ``random_init=True``
    (benchmarks) builds the architecture with random weights and needs none. ``behind_proxy``: the
    entry point found a proxy configured (``$HTTPS_PROXY``...), so the quick hub probe is skipped.
    """
    import open_clip
    import torch

    if random_init:
        weights, key, label = None, f"{model}/random", "random"
    else:
        weights, key, label = _resolve_weights(
            model, pretrained, cache_dir=cache_dir, behind_proxy=behind_proxy
        )
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
    model: str, pretrained: str | None, *, cache_dir: Path | None, behind_proxy: bool = False
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
        cached = not cfg.get("hf_hub") or _in_hub_cache(cfg["hf_hub"], cache_dir)
        if not cached and _hub_unreachable(behind_proxy=behind_proxy):
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


def _hub_unreachable(timeout_s: float = 3.0, *, behind_proxy: bool = False) -> bool:
    """True when downloads are allowed but the hub's host does not answer: huggingface_hub would
    retry for about a minute before failing, and an offline pipeline must skip in seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or behind_proxy:
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


# --------------------------------------------------------------------------- text


def builtin_templates(name: str) -> tuple[str, ...]:
    """open_clip's prompt templates ``name`` (one of :data:`TEMPLATE_SETS`), with ``{}`` for the class."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = dict(zip(TEMPLATE_SETS, (OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES), strict=True))
    if name not in sets:
        raise ConfigError(f"no open_clip template set {name!r}: expected one of {', '.join(TEMPLATE_SETS)}")
    return tuple(t("{}") for t in sets[name])  # open_clip's templates are lambdas of the class name


def build_text_classifier(
    encoder: ClipEncoder, prompts: Sequence[Sequence[str]], *, batch_size: int = 256
) -> np.ndarray:
    """Zero-shot weights (K, D): per class, the mean of its normalised prompt embeddings, renormalised.
    prompts: K lists of prompts (:func:`components.baseline.prompts.class_prompts`)."""
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
    encode: Callable[[list[Path]], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """(features (N, D) in ``image_ids`` order, how many images were encoded now).

    Only images the cache lacks are decoded and encoded (in chunks, each appended to the cache as
    soon as it is done). Without a cache every distinct image is encoded. ``encode``: paths ->
    features (N, D) done elsewhere (the pipeline passes Ray Data's, for large data), instead of the
    local loader; it must use this encoder's weights and preprocessing.
    """
    from torch.utils.data import DataLoader

    from components.data.datasets import ManifestDataset

    cache = cache if cache is not None else MemoryCache()
    path_of = dict(zip(image_ids, paths, strict=True))
    todo = cache.missing(image_ids)
    for start in range(0, len(todo), _ENCODE_CHUNK):
        chunk = todo[start : start + _ENCODE_CHUNK]
        if encode is not None:
            cache.put(chunk, encode([path_of[i] for i in chunk]))
            continue
        ds = ManifestDataset(
            [path_of[i] for i in chunk], [0] * len(chunk), transform=encoder.preprocess, mode="RGB"
        )
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
        cache.put(chunk, encode_image_batches(encoder, loader))
        logger.info("encoded %d / %d images with %s", start + len(chunk), len(todo), encoder.key)
    return cache.get(image_ids), len(todo)
