"""``imgflow classes add/list/remove``: classes from a few support images, as new registered versions.

Glue like :mod:`components.pipeline.models`: :mod:`components.model.fewshot` builds the new model
folder (prototypes on a stored layer, no retraining), the embedding store gives the base training
set's features, the registry registers the folder as a new version of ``register.model_name``.

Everything that can fail on the user's input (the support folder, a name that exists, the layer) is
checked, and the new folder built, before anything is written to MLflow: a bad support set leaves
the registry as it was.

Gates of a version with added classes: the base version's own gate verdict (its test evidence is
about the classes the network was trained on, which the new version answers as before), and
``fewshot_base_agreement``: on the test split's base-class images, the share whose predicted class
is the same as the base version's (at least :data:`MIN_BASE_AGREEMENT`). A version that fails is
registered as ``candidate`` only and ``imgflow promote`` refuses it, as any other.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import Params
from components.core.errors import DataError
from components.data.manifest import read_manifest
from components.model.features import FEWSHOT_LAYER
from components.pipeline.context import StagePaths, connect_tracking, experiment_id, registry_options
from components.pipeline.models import model_dir as fetch_model_dir

MIN_BASE_AGREEMENT = 0.95
"""Share of base test images whose answer must not change when classes are added."""
HELDOUT_ROWS, AGREEMENT_IMAGES = 2000, 500
"""Caps: val rows that calibrate the router's scale; test images the agreement gate predicts."""


@dataclass(frozen=True)
class ClassesChange:
    """What ``classes add`` / ``classes remove`` registered."""

    name: str
    version: str
    base_version: str
    base_model: str
    classes: tuple[str, ...]
    """Every class of the new version (trained first, then added)."""
    added: tuple[str, ...]
    """The classes added from support images (all of them, not only this call's)."""
    changed: tuple[str, ...]
    """This call's classes (added or removed)."""
    layer: str
    scale: float | None
    base_agreement: float
    gates_passed: bool
    aliases: tuple[str, ...]
    tags: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- commands


def run_classes_add(
    params: Params, folder: Path, *, k: int = 5, model: str | None = None, layer: str = FEWSHOT_LAYER
) -> ClassesChange:
    """``imgflow classes add``: each sub-folder of ``folder`` (at least ``k`` images) becomes a class of
    a new version of the registered model ``model`` (default: the champion)."""
    from components.model import fewshot
    from components.model.checkpoint import load_classifier
    from components.model.features import check_layer

    check_layer(layer)
    images = fewshot.read_support_folder(folder, k=k)
    with tempfile.TemporaryDirectory(prefix="imgflow-classes-") as tmp:
        src, uri = fetch_model_dir(params, model, Path(tmp))
        base_model, spec = load_classifier(src)
        feats = {n: fewshot.support_features(base_model, spec, b, layer=layer) for n, b in images.items()}
        hashes = {n: fewshot.support_hash({n: b}) for n, b in images.items()}
        base = _base_features(params, src, spec.classes, layer=layer, fewshot_bank=fewshot.read_bank(src))
        out = Path(tmp) / "new" / "model"
        bank = fewshot.add_classes(src, out, feats, base=base, layer=layer, hashes=hashes)
        tags = {"fewshot_support_hash": fewshot.support_hash(images), "fewshot_layer": layer,
                "fewshot_centre_hash": fewshot.vector_hash(bank.centre), "fewshot_scale": f"{bank.scale:.4g}",
                "fewshot_action": f"add {','.join(images)}"}  # fmt: skip
        return _register(params, src, out, uri, changed=tuple(images), tags=tags, scale=bank.scale)


def run_classes_remove(params: Params, name: str, *, model: str | None = None) -> ClassesChange:
    """``imgflow classes remove``: a new version of ``model`` (default: the champion) without added class
    ``name``."""
    from components.model import fewshot

    with tempfile.TemporaryDirectory(prefix="imgflow-classes-") as tmp:
        src, uri = fetch_model_dir(params, model, Path(tmp))
        out = Path(tmp) / "new" / "model"
        bank = fewshot.remove_class(src, out, name)
        tags = {"fewshot_action": f"remove {name}"}
        if bank is not None:
            tags.update(fewshot_layer=bank.layer, fewshot_centre_hash=fewshot.vector_hash(bank.centre))
        scale = bank.scale if bank is not None else None
        return _register(params, src, out, uri, changed=(name,), tags=tags, scale=scale)


def run_classes_list(params: Params, *, model: str | None = None) -> dict[str, Any]:
    """``imgflow classes list``: the model's trained and added classes, with each added class's support."""
    from components.model import fewshot
    from components.model.checkpoint import load_spec

    with tempfile.TemporaryDirectory(prefix="imgflow-classes-") as tmp:
        src, uri = fetch_model_dir(params, model, Path(tmp))
        spec, bank = load_spec(src), fewshot.read_bank(src)
    base_count = bank.base_count if bank else spec.num_classes
    return {
        "model": uri,
        "trained": list(spec.classes[:base_count]),
        "added": [
            {"name": n, **(bank.support.get(n, {}) if bank else {})} for n in spec.classes[base_count:]
        ],
        "layer": bank.layer if bank else None,
        "scale": bank.scale if bank else None,
    }


# --------------------------------------------------------------------------- base features


def _base_features(
    params: Params, model_dir: Path, classes: tuple[str, ...], *, layer: str, fewshot_bank: Any
) -> Any:
    """The base model's training and held-out (val) features from the embedding store, labelled by
    base class index (rows of other labels are left out)."""
    from components.data.manifest import DataPaths, data_version, require_manifest
    from components.model.embedding_store import embed_project
    from components.model.fewshot import BaseFeatures

    paths = DataPaths(params.project.data_dir)
    if not paths.manifest.exists():
        raise DataError(
            f"no data version at {paths.root}: the base training set's features centre the prototypes; "
            "run `imgflow ingest` (the data the model was trained on) first"
        )
    store = embed_project(params, model_dir, layer=layer)
    base_count = fewshot_bank.base_count if fewshot_bank is not None else len(classes)
    index = {c: i for i, c in enumerate(classes[:base_count])}
    label_of = dict(zip(read_manifest(paths.manifest)["image_id"], read_manifest(paths.manifest)["label"],
                        strict=True))  # fmt: skip
    labels = np.array([index.get(label_of.get(i, ""), -1) for i in store.ids])
    splits = np.asarray(store.splits)
    train, held = (splits == "train") & (labels >= 0), np.flatnonzero((splits == "val") & (labels >= 0))
    if not train.any():
        raise DataError(f"data version at {paths.root} has no training images of the model's classes")
    held = np.random.default_rng(0).permutation(held)[:HELDOUT_ROWS]
    vectors = np.asarray(store.vectors)
    return BaseFeatures(train=vectors[train], train_labels=labels[train], heldout=vectors[held],
                        heldout_labels=labels[held], data_version=data_version(require_manifest(paths)))  # fmt: skip


# --------------------------------------------------------------------------- gate and registration


def base_agreement(params: Params, base_dir: Path, new_dir: Path) -> float:
    """Share of test-split images of the base model's classes whose predicted class is the same under
    both models (1.0 when the data has no test images)."""
    from components.model.checkpoint import Predictor

    base, new = Predictor.from_dir(base_dir), Predictor.from_dir(new_dir)
    manifest = read_manifest(StagePaths(params).data.manifest)
    base_count = len(base.spec.classes)
    test = manifest[(manifest["split"] == "test") & manifest["label"].isin(base.spec.classes[:base_count])]
    rows = test.sample(n=min(AGREEMENT_IMAGES, len(test)), random_state=0) if len(test) else test
    if not len(rows):
        return 1.0
    images = [(params.project.data_dir / p).read_bytes() for p in rows["path"]]
    before = np.asarray(base.spec.classes)[base.predict_proba(images).argmax(1)]
    after = np.asarray(new.spec.classes)[new.predict_proba(images).argmax(1)]
    return float((before == after).mean())


def _register(
    params: Params,
    src: Path,
    out: Path,
    uri: str,
    *,
    changed: tuple[str, ...],
    tags: dict[str, str],
    scale: float | None,
) -> ClassesChange:
    """Register the folder ``out`` (made from ``src``, the version ``uri`` names) as a new version."""
    from components.model.checkpoint import load_spec
    from components.model.fewshot import read_bank

    agreement = base_agreement(params, src, out)
    connect_tracking(params)
    name = params.register_.model_name
    base_version, base_tags = _base_version(name, uri)
    spec, bank = load_spec(out), read_bank(out)
    passed = base_tags.get("gates_passed") == "true" and agreement >= MIN_BASE_AGREEMENT
    failed = [] if agreement >= MIN_BASE_AGREEMENT else ["fewshot_base_agreement"]
    failed += [g for g in base_tags.get("failed_gates", "").split(",") if g]
    all_tags: dict[str, str] = {
        k: base_tags[k] for k in ("data_version", "git_commit", "task") if k in base_tags
    }
    all_tags.update(tags, base_version=base_version, fewshot_base_agreement=f"{agreement:.4f}",
                    fewshot_classes=",".join(spec.classes[bank.base_count:] if bank else ())[:4900],
                    gates_passed=str(passed).lower(), failed_gates=",".join(failed))  # fmt: skip
    reg = _log_and_register(params, out, name=name, tags=all_tags, passed=passed, failed=failed, spec=spec)
    added = tuple(spec.classes[bank.base_count :]) if bank else ()
    return ClassesChange(
        name=name, version=reg.version, base_version=base_version, base_model=uri, classes=tuple(spec.classes),
        added=added, changed=changed, layer=bank.layer if bank else "", scale=scale, base_agreement=agreement,
        gates_passed=passed, aliases=reg.aliases, tags=all_tags,
    )  # fmt: skip


def _base_version(name: str, uri: str) -> tuple[str, dict[str, str]]:
    """The registered version ``uri`` names and its tags (a DataError for a model outside the registry:
    a new version needs a registered one to descend from)."""
    from components.registry import tracking

    resolved = tracking.resolve_model_version(uri)
    if resolved is None or resolved[0] != name:
        raise DataError(f"{uri} is not a version of the registered model {name!r}: give --model "
                        f"models:/{name}@<alias> or models:/{name}/<version>")  # fmt: skip
    version = resolved[1]
    rows = [v for v in tracking.list_versions(name) if v["version"] == version]
    return version, dict(rows[0]["tags"]) if rows else {}


def _log_and_register(
    params: Params, out: Path, *, name: str, tags: dict[str, str], passed: bool, failed: list[str], spec: Any
) -> Any:
    """One MLflow run holding the model folder as a pyfunc, registered as a new version of ``name``."""
    from components.pipeline.stages import serving_pip_requirements
    from components.registry import registry, tracking

    run = tracking.start_run(experiment_id(params), run_name=f"classes {tags['fewshot_action']}",
                             params={"fewshot": json.dumps(spec.extra.get("fewshot", {}))[:6000]},
                             tags={"imgflow_stage": "classes"})  # fmt: skip
    try:
        model_uri = tracking.log_pyfunc_model(run.run_id, model_dir=out, example_image=_example_image(spec),
                                              pip_requirements=serving_pip_requirements())  # fmt: skip
        card = registry.ModelCard(
            task=spec.task.title, classes=tuple(spec.classes), data_version=tags.get("data_version", ""),
            git_commit=tags.get("git_commit", ""), gates_passed=passed,
            headline=f"base-class answers kept {float(tags['fewshot_base_agreement']):.1%}",
            gate_verdict="passed" if passed else f"failed: {', '.join(failed)}", failed_gates=tuple(failed),
        )  # fmt: skip
        reg = registry.register_version(model_uri, name=name, run_id=run.run_id, tags=tags, card=card,
                                        auto_promote=params.register_.auto_promote, **registry_options(params))  # fmt: skip
    except BaseException:
        tracking.end_run(run.run_id, status="FAILED")
        raise
    tracking.end_run(run.run_id)
    return reg


def _example_image(spec: Any) -> bytes:
    """A blank PNG of the model's input size: the pyfunc's input example (any image will do)."""
    import io

    from PIL import Image

    _, height, width = spec.data_config["input_size"]
    buf = io.BytesIO()
    Image.new("L" if spec.in_chans == 1 else "RGB", (int(width), int(height))).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- episodic evaluation

PER_CLASS_CAP, CENTRE_IMAGES = 200, 500
"""Test images per class the episodes draw from; training images whose class means centre SimpleShot."""


def run_fewshot_evaluation(
    params: Params,
    *,
    model: str | None = None,
    n_way: int = 5,
    ks: tuple[int, ...] = (1, 5, 10),
    episodes: int = 300,
    n_query: int = 15,
    seed: int = 0,
    layer: str = FEWSHOT_LAYER,
    classes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``imgflow evaluate --few-shot``: seeded N-way episodes over the test split (``classes``, default
    all; at most :data:`PER_CLASS_CAP` images each), the model's stored layer against raw pixels and a
    random-init copy of its architecture, all on the same episodes."""
    from components.evaluate.fewshot import evaluate_episodes, table_text
    from components.model.checkpoint import load_classifier
    from components.model.embedding_store import embed_project

    paths = StagePaths(params).data
    if not paths.manifest.exists():
        raise DataError(f"no data version at {paths.root}: run `imgflow ingest` first")
    manifest = read_manifest(paths.manifest)
    with tempfile.TemporaryDirectory(prefix="imgflow-fewshot-") as tmp:
        src, uri = fetch_model_dir(params, model, Path(tmp))
        store = embed_project(params, src, layer=layer)
        net, spec = load_classifier(src)
        test, train = _episode_rows(manifest, classes, seed=seed), manifest[manifest["split"] == "train"]
        train = train.sample(n=min(CENTRE_IMAGES, len(train)), random_state=seed)
        feats, centres = _episode_features(params, net, spec, store, test, train, layer=layer, seed=seed)
    labels = test["label"].to_numpy()
    rows = evaluate_episodes(feats, labels, n_way=n_way, ks=ks, n_query=n_query, episodes=episodes, seed=seed,
                             centres=centres)  # fmt: skip
    return {"model": uri, "layer": layer, "n_way": n_way, "episodes": episodes, "n_query": n_query, "seed": seed,
            "classes": sorted(set(labels)), "images": len(labels), "rows": [r.to_dict() for r in rows],
            "table": table_text(rows)}  # fmt: skip


def _episode_rows(manifest: Any, classes: tuple[str, ...], *, seed: int) -> Any:
    """The test rows of ``classes`` (all when empty), at most :data:`PER_CLASS_CAP` per class."""
    test = manifest[manifest["split"] == "test"]
    if classes:
        unknown = sorted(set(classes) - set(test["label"]))
        if unknown:
            raise DataError(
                f"no test images of class {unknown[0]!r}: classes are {', '.join(sorted(set(test['label'])))}"
            )
        test = test[test["label"].isin(classes)]
    return test.sample(frac=1.0, random_state=seed).groupby("label").head(PER_CLASS_CAP)


def _episode_features(
    params: Params, net: Any, spec: Any, store: Any, test: Any, train: Any, *, layer: str, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features of the episode rows per representation (the stored layer, pixels, random init) and each
    one's training class means (SimpleShot's centring)."""
    import torch

    from components.model.checkpoint import Predictor
    from components.model.features import extract_features
    from components.model.fewshot import base_class_count, class_means
    from components.model.models import create_classifier

    predictor = Predictor(net, spec)

    def pixels(rows: Any) -> torch.Tensor:
        return predictor.preprocess([(params.project.data_dir / p).read_bytes() for p in rows["path"]])

    x_test, x_train = pixels(test), pixels(train)
    torch.manual_seed(seed)
    outputs = base_class_count(spec.extra, spec.num_classes)
    random_net = create_classifier(spec.model, outputs, in_chans=spec.in_chans, pretrained=False).eval()
    feats = {"model": store.rows(list(test["image_id"])), "pixels": x_test.flatten(1).numpy(),
             "random_init": extract_features(random_net, x_test, layer=layer)}  # fmt: skip
    labels = train["label"].to_numpy()
    train_feats = {"model": store.rows(list(train["image_id"])), "pixels": x_train.flatten(1).numpy(),
                   "random_init": extract_features(random_net, x_train, layer=layer)}  # fmt: skip
    # SimpleShot's episodes centre on the training class means' balanced mean with the support means,
    # as `imgflow classes add` does.
    centres = {name: class_means(f, labels) for name, f in train_feats.items()}
    return feats, centres
