"""CLIP baselines without downloadable weights: a tiny open_clip model trained here, on CPU.

No registry ships CLIP weights, so the mechanics are proven on a tiny CLIP (conv image tower,
one-layer text tower) trained contrastively for 300 steps on synthetic captioned images
("a photo of a red circle"); then zero-shot on held-out images must be far above chance, the
prompt ensemble and overrides must shape the text embeddings as specified, the stage must load
the checkpoint from a path, cache embeddings, and — with no weights at all — record a skipped
baseline instead of failing.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from components.baseline import clip_baseline as cb
from components.baseline.embeddings import EmbeddingCache, cache_dir_for
from components.core.config import params_from_dict
from components.core.errors import ConfigError
from components.pipeline.stages import run_baseline, run_ingest
from components.task.metrics import compute_metrics
from tests.conftest import REPO

TINY = "imgflow-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},  # a ModifiedResNet
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
CHANCE = 1 / len(CLASSES)


def draw(cls: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A coloured shape of class ``"<colour> <shape>"`` at a random place, size and grey background."""
    colour, shape = cls.split()
    grey = int(rng.integers(0, 256))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    r = int(rng.integers(9, 15))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _train_contrastively(encoder: cb.ClipEncoder, *, steps: int = 300, seed: int = 0) -> None:
    """Symmetric InfoNCE (CLIP's loss) on (image, caption) pairs; captions from the 80 templates."""
    model, rng = encoder.model, np.random.default_rng(seed)
    pool = torch.stack([torch.stack([encoder.preprocess(draw(c, rng)) for _ in range(50)]) for c in CLASSES])
    templates = cb.resolve_templates("imagenet80")
    tokens = encoder.tokenizer([t.format(c) for t in templates for c in CLASSES]).view(
        len(templates), len(CLASSES), -1
    )
    cls = torch.arange(len(CLASSES)).repeat(2)  # every class twice per batch
    model.token_embedding.weight.requires_grad_(False)  # 49408 x 32 random codes are input enough
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two fighting on a shared box
    torch.manual_seed(seed)
    model.train()
    try:
        for _ in range(steps):
            img_i = torch.from_numpy(rng.integers(0, pool.shape[1], size=len(cls)))
            tpl_i = torch.from_numpy(rng.integers(0, len(templates), size=len(cls)))
            img, txt, scale = model(pool[cls, img_i], tokens[tpl_i, cls])
            logits = scale * img @ txt.T
            target = torch.arange(len(cls))
            loss = (
                torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)
            ) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CLIP config registered with open_clip, trained once; its checkpoint as a file and as
    an open_clip ``local-dir:`` folder."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny-clip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    encoder = cb.create_clip(TINY, None, random_init=True)
    _train_contrastively(encoder)
    checkpoint = root / "tiny_clip.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    local = root / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    shutil.copy2(checkpoint, local / "open_clip_pytorch_model.bin")
    return {"checkpoint": checkpoint, "local_dir": local, "encoder": cb.create_clip(TINY, str(checkpoint))}


@pytest.fixture(scope="module")
def held_out(tiny_clip: dict) -> tuple[torch.Tensor, np.ndarray]:
    """15 new images per class, preprocessed: (180, 3, 32, 32) and their class indices (180,)."""
    rng = np.random.default_rng(123)  # never the training seed: new positions, sizes, backgrounds
    preprocess = tiny_clip["encoder"].preprocess
    x = torch.stack([preprocess(draw(c, rng)) for c in CLASSES for _ in range(15)])
    return x, np.repeat(np.arange(len(CLASSES)), 15)


def _zero_shot_accuracy(encoder: cb.ClipEncoder, held_out: tuple, templates: str = "imagenet80") -> float:
    x, y = held_out
    weights = cb.build_text_classifier(encoder, cb.class_prompts(CLASSES, cb.resolve_templates(templates)))
    probs = cb.zero_shot_probs(cb.encode_image_batches(encoder, x.split(64)), weights, encoder.logit_scale)
    return compute_metrics(y, probs, CLASSES)["accuracy"]


# --------------------------------------------------------------------------- the model and prompts


def test_zero_shot_on_held_out_images_is_far_above_chance(tiny_clip: dict, held_out: tuple) -> None:
    encoder = tiny_clip["encoder"]  # loaded back from the checkpoint *file* (baseline.pretrained=path)
    assert encoder.key.startswith(f"{TINY}/sha256:")
    for templates in ("imagenet80", "short"):
        assert _zero_shot_accuracy(encoder, held_out, templates) >= 0.6 > 5 * CHANCE
    untrained = cb.create_clip(TINY, None, random_init=True)
    assert (
        _zero_shot_accuracy(untrained, held_out, "short") < 0.35
    )  # the accuracy comes from the learned weights


def test_local_dir_checkpoint_loads_the_same_weights(tiny_clip: dict, held_out: tuple) -> None:
    from_dir = cb.create_clip(f"local-dir:{tiny_clip['local_dir']}", None)
    x = held_out[0][::10]
    a = cb.encode_image_batches(from_dir, [x])
    b = cb.encode_image_batches(tiny_clip["encoder"], [x])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert from_dir.logit_scale == pytest.approx(tiny_clip["encoder"].logit_scale)
    assert from_dir.key.startswith("local-dir/sha256:")


def _text(encoder: cb.ClipEncoder, prompt: str) -> np.ndarray:
    with torch.inference_mode():
        e = encoder.model.encode_text(encoder.tokenizer([prompt]), normalize=True)[0]
    return e.numpy()


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompt_embeddings(tiny_clip: dict) -> None:
    encoder = tiny_clip["encoder"]
    templates = cb.resolve_templates("short")
    weights = cb.build_text_classifier(encoder, cb.class_prompts(CLASSES, templates))
    assert weights.shape == (len(CLASSES), TINY_CFG["embed_dim"])
    for k in (0, 7):
        mean = np.mean([_text(encoder, t.replace("{}", CLASSES[k])) for t in templates], axis=0)
        np.testing.assert_allclose(weights[k], mean / np.linalg.norm(mean), atol=1e-5)
    single = cb.build_text_classifier(encoder, cb.class_prompts(CLASSES, ["a photo of a {}."]))
    np.testing.assert_allclose(single[3], _text(encoder, f"a photo of a {CLASSES[3]}."), atol=1e-5)
    assert not np.allclose(single, weights, atol=1e-3)  # the ensemble really changes the embedding


def test_per_class_overrides_change_only_their_class(tiny_clip: dict) -> None:
    encoder, templates = tiny_clip["encoder"], ["a photo of a {}."]
    base = cb.build_text_classifier(encoder, cb.class_prompts(CLASSES, templates))
    prompts = cb.class_prompts(
        CLASSES,
        templates,
        names={"green square": "emerald square"},
        overrides={"red circle": ["a photo of a blue square."]},
    )
    assert prompts[CLASSES.index("green square")] == ["a photo of a emerald square."]
    weights = cb.build_text_classifier(encoder, prompts)
    red, blue = CLASSES.index("red circle"), CLASSES.index("blue square")
    np.testing.assert_allclose(weights[red], base[blue], atol=1e-5)  # red circle now reads "blue square"
    untouched = [k for k in range(len(CLASSES)) if CLASSES[k] not in ("red circle", "green square")]
    np.testing.assert_allclose(weights[untouched], base[untouched], atol=1e-6)
    with pytest.raises(ConfigError, match="purple hexagon"):
        cb.class_prompts(CLASSES, templates, overrides={"purple hexagon": ["x"]})


def test_template_sets_and_template_files(tmp_path: Path) -> None:
    assert len(cb.resolve_templates("imagenet80")) == 80 and len(cb.resolve_templates("short")) == 7
    assert all("{}" in t for t in cb.resolve_templates("imagenet80"))
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na photo of a {}.\n\nan icon of a {}\n")
    assert cb.resolve_templates(str(f)) == ("a photo of a {}.", "an icon of a {}")
    f.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ConfigError, match="without a slot"):
        cb.resolve_templates(str(f))
    with pytest.raises(ConfigError, match="imagenet80"):
        cb.resolve_templates(str(tmp_path / "missing.txt"))


def test_zero_shot_probs_use_the_logit_scale() -> None:
    img = np.array([[3.0, 0.0], [0.0, 0.5]])  # unnormalised: only the direction counts
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = cb.zero_shot_probs(img, text, logit_scale=2.0)
    np.testing.assert_allclose(p[0], np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum())
    assert cb.zero_shot_probs(img, text, logit_scale=100.0)[0, 0] > 0.999


def test_linear_probe_picks_c_on_val_and_covers_unseen_classes() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = np.repeat([0, 1], 30)  # class 2 never appears in training
    x = centres[y] + rng.normal(size=(60, 8))
    probe = cb.fit_linear_probe(x[::2], y[::2], x_val=x[1::2], y_val=y[1::2])
    assert probe.C in cb.PROBE_C_GRID and probe.val_accuracy is not None and probe.val_accuracy > 0.9
    probs = probe.predict_proba(x, n_classes=3)
    assert probs.shape == (60, 3) and np.allclose(probs.sum(axis=1), 1) and np.all(probs[:, 2] == 0)
    assert cb.fit_linear_probe(x, y, C=0.5).C == 0.5  # no val images: the given C, no sweep


def test_bad_weights_settings_are_config_errors_and_missing_weights_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a pretrained tag"):
        cb.create_clip("ViT-B-32", str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="not an open_clip model"):
        cb.create_clip("ViT-B-99", "openai")
    with pytest.raises(cb.WeightsUnavailableError):  # HF_HUB_OFFLINE=1 and an empty cache
        cb.create_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path / "hub")
    hub = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc123")
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    assert not cb._in_hub_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K/", tmp_path / "hub")
    (hub / "snapshots" / "abc123" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert cb._in_hub_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K/", tmp_path / "hub")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    with pytest.raises(cb.WeightsUnavailableError, match="no checkpoint"):
        cb.create_clip(f"local-dir:{tmp_path / 'dir'}", None)


# --------------------------------------------------------------------------- embedding cache


def test_embedding_cache_encodes_each_image_once(tmp_path: Path, tiny_clip: dict) -> None:
    encoder, rng = tiny_clip["encoder"], np.random.default_rng(7)
    paths = []
    for i, c in enumerate(CLASSES[:6]):
        paths.append(tmp_path / f"{i}.png")
        draw(c, rng).save(paths[-1])
    ids = [f"id{i}" for i in range(len(paths))]
    root = tmp_path / "embeddings"
    first, n_first = cb.embed_images(
        encoder, ids[:4], paths[:4], cache=EmbeddingCache(root, encoder.key), batch_size=3
    )
    assert n_first == 4 and first.shape == (4, TINY_CFG["embed_dim"])
    cache = EmbeddingCache(root, encoder.key)  # a new process would see the same files
    again, n_again = cb.embed_images(encoder, ids, paths, cache=cache, batch_size=3)
    assert n_again == 2 and len(cache) == 6  # only the two new images were encoded
    np.testing.assert_allclose(again[:4], first, rtol=1e-6)
    direct = cb.embed_images(encoder, ids, paths, cache=None)[0]
    np.testing.assert_allclose(again, direct, rtol=1e-4, atol=1e-5)
    assert cb.embed_images(encoder, ids[::-1], paths[::-1], cache=cache)[1] == 0
    assert cache_dir_for(root, encoder.key) != cache_dir_for(root, f"{TINY}/other-weights")


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def shapes_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ingested image folder of 12 shape classes, with 3 red circles filed as blue squares."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(11)
    for c in CLASSES:
        (root / "images" / c).mkdir(parents=True)
        for i in range(20):
            draw(c, rng).save(root / "images" / c / f"{i}.png")
    for i in range(3):
        draw("red circle", rng).save(root / "images" / "blue square" / f"mislabelled{i}.png")
    run_ingest(_params(root, source=f"imagefolder:{root / 'images'}"), progress=False)
    return root


def _params(root: Path, *, out: str = "outputs", sections: dict | None = None, **baseline: object):
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in (sections or {}).items():
        raw[name].update(values)
    raw["project"].update(
        data_dir=str(root / "data"), output_dir=str(root / out), state_dir=str(root / ".imgflow")
    )
    raw["ingest"].update(source=baseline.pop("source", "fashion-mnist"))
    raw["split"].update(val_fraction=0.2, test_fraction=0.25)
    raw["register"]["experiment"] = "clip-test"
    raw["baseline"].update(baseline)
    return params_from_dict(raw)


def _runs(root: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root / '.imgflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clip-test")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_stage_loads_a_local_checkpoint_and_logs_both_baselines(
    shapes_project: Path, tiny_clip: dict
) -> None:
    root = shapes_project
    params = _params(
        root, model=TINY, pretrained=str(tiny_clip["checkpoint"]), probe_max_per_class=None,
        disagreement_min_confidence=0.5, batch_size=32, probe_C=1.0,
    )  # fmt: skip
    result = run_baseline(params)
    assert result["status"] == "ok", result
    assert result["zero_shot_accuracy"] >= 0.6 and result["linear_probe_accuracy"] >= 0.6
    out = root / "outputs" / "baseline"
    record = json.loads((out / "baseline.json").read_text())
    assert [r["class"] for r in record["zero_shot"]["per_class"]] == sorted(CLASSES)
    assert record["embeddings"]["encoded"] == record["embeddings"]["images"] == 243  # every image once
    assert (
        json.loads((out / "metrics.json").read_text())["zero_shot_accuracy"] == result["zero_shot_accuracy"]
    )
    with open(out / "per_class.csv") as f:
        assert len(list(csv.DictReader(f))) == len(CLASSES)

    # the same per-class metric names as the trained model's run (test_*), one run per baseline
    runs = {r.data.tags["baseline"]: r for r in _runs(root)}
    assert set(runs) == {"zero_shot", "linear_probe"}
    zs = runs["zero_shot"].data
    assert zs.metrics["test_accuracy"] == pytest.approx(result["zero_shot_accuracy"])
    assert "test_recall_red_circle" in zs.metrics and zs.tags["baseline_status"] == "ok"
    assert runs["linear_probe"].data.metrics["test_accuracy"] == pytest.approx(
        result["linear_probe_accuracy"]
    )

    # the three red circles filed under "blue square" are flagged for the label-quality ledger
    with open(out / "disagreements.csv") as f:
        flagged = [
            r for r in csv.DictReader(f) if r["label"] == "blue square" and r["clip_label"] == "red circle"
        ]
    assert len(flagged) >= 2 and all(float(r["confidence"]) >= 0.5 for r in flagged)
    # ... and recorded in the ledger as one more signal (issue clip_disagreement, CLIP's class suggested)
    from components.quality.ledger import read_ledger

    ledger = read_ledger(root / ".imgflow" / "audit-ledger").set_index("image_id")
    for r in flagged:
        row = ledger.loc[r["image_id"]]
        assert row["issue"] == "clip_disagreement" and row["suggested_label"] == "red circle"
    assert result["ledger"]["new"] >= len(flagged)
    assert (out / "ledger" / "issues.csv").is_file()

    again = run_baseline(params)  # the embedding cache: nothing is encoded twice
    assert again["embeddings"]["encoded"] == 0 and again["zero_shot_accuracy"] == result["zero_shot_accuracy"]


def test_offline_without_weights_the_stage_is_skipped_not_failed(
    shapes_project: Path, tmp_path: Path
) -> None:
    root = shapes_project
    params = _params(root, out="offline-outputs", cache_dir=str(tmp_path / "empty-hub-cache"))
    result = run_baseline(params)  # the default ViT-B-32 tag: no weights anywhere, HF_HUB_OFFLINE=1
    assert result["status"] == "skipped" and result["reason"].startswith("skipped: weights unavailable")
    out = root / "offline-outputs" / "baseline"
    record = json.loads((out / "baseline.json").read_text())
    assert record["zero_shot"] is None and record["status"] == "skipped"
    assert json.loads((out / "metrics.json").read_text()) == {"available": False}
    assert (out / "disagreements.csv").read_text().startswith("image_id,split,label,clip_label,confidence")
    run = next(r for r in _runs(root) if r.info.run_id == result["mlflow_runs"]["skipped"])
    assert run.data.tags["baseline_status"] == "skipped"
    assert run.data.tags["mlflow.note.content"].startswith("skipped: weights unavailable")

    # the optional gate is not applicable and does not pass
    trained = compute_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    (gate,) = cb.check_beats_baseline(trained, record, margin=0.0)
    assert not gate.passed and cb.is_not_applicable(gate) and "weights unavailable" in gate.message

    disabled = run_baseline(_params(root, out="off-outputs", enabled=False))
    assert disabled["status"] == "disabled"


def test_gate_trained_must_beat_zero_shot_overall_and_per_class() -> None:
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 2, 2])
    onehot = np.eye(3)[y] * 0.8 + 0.2 / 3
    trained = compute_metrics(y, onehot, classes)  # perfect
    weak = onehot.copy()
    weak[[0, 1]] = [0.1, 0.8, 0.1]  # zero-shot misses both "a" images
    zero_shot = compute_metrics(y, weak, classes)
    gates = cb.check_beats_baseline(trained, zero_shot, margin=0.1)
    assert [g.name for g in gates] == [
        "beats_zero_shot[accuracy]", "beats_zero_shot[a]", "beats_zero_shot[b]", "beats_zero_shot[c]",
    ]  # fmt: skip
    # recall of b and c: 1.0 vs 1.0 + 0.1 -> fail; a: 1.0 vs 0.0 + 0.1 -> pass; accuracy 1.0 vs 0.667 + 0.1
    assert [g.passed for g in gates] == [True, True, False, False]
    assert all(g.passed for g in cb.check_beats_baseline(trained, zero_shot, margin=0.0))
    (na,) = cb.check_beats_baseline(trained, None, margin=0.0)
    assert not na.passed and cb.is_not_applicable(na)


def _untrained_model_and_run(params) -> None:
    """outputs/train/model: an untrained imgflow_cnn for the 12 shape classes (far below CLIP), and
    outputs/train/run.json: its MLflow run, as the train stage would leave them."""
    from components.model.checkpoint import ModelSpec, save_classifier
    from components.model.models import create_classifier, resolve_data_config
    from components.registry import tracking

    torch.manual_seed(0)
    model = create_classifier("imgflow_cnn", len(CLASSES), in_chans=3)
    spec = ModelSpec("imgflow_cnn", tuple(sorted(CLASSES)), 3, resolve_data_config(model, input_size=32))
    out = params.project.output_dir / "train"
    save_classifier(model.eval().state_dict(), spec, out / "model")
    tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    exp = tracking.ensure_experiment(params.register_.experiment)
    run = tracking.start_run(exp, run_name="untrained", params={}, tags={})
    (out / "run.json").write_text(json.dumps({**run.to_dict(), "data_version": "test"}))


def test_evaluate_compares_with_the_real_baseline_and_gates_on_it(
    shapes_project: Path, tiny_clip: dict
) -> None:
    from components.pipeline.stages import run_evaluate

    root = shapes_project
    params = _params(
        root, out="eval-outputs", model=TINY, pretrained=str(tiny_clip["checkpoint"]), batch_size=32,
        probe_C=1.0, gate=True, gate_margin=0.0,
        sections={"evaluate": {"robustness": {"enabled": False}, "compare_champion": False},
                  "gates": {"min_accuracy": 0.0, "min_class_recall": 0.0, "max_ece": 1.0, "min_slice_accuracy": 0.0}},
    )  # fmt: skip
    baseline = run_baseline(params)
    assert baseline["status"] == "ok" and baseline["zero_shot_accuracy"] >= 0.6
    _untrained_model_and_run(params)
    result = run_evaluate(params)

    record = json.loads((root / "eval-outputs" / "baseline" / "baseline.json").read_text())
    report = json.loads(Path(result["report_json"]).read_text())
    table = report["baseline"]
    assert table["status"] == "ok"
    assert table["overall"]["zero_shot"]["accuracy"] == record["zero_shot"]["accuracy"]
    assert table["overall"]["linear_probe"]["accuracy"] == record["linear_probe"]["accuracy"]
    assert table["overall"]["trained"]["accuracy"] == result["accuracy"] < record["zero_shot"]["accuracy"]
    zs_recall = {r["class"]: r["recall"] for r in record["zero_shot"]["per_class"]}
    assert [r["class"] for r in table["per_class"]] == sorted(CLASSES)
    assert all(r["zero_shot"] == zs_recall[r["class"]] for r in table["per_class"])
    # the untrained model is far below zero-shot CLIP: the optional gate fails, with real numbers
    assert "beats_zero_shot[accuracy]" in result["gates"]["failed"] and not result["gates_passed"]
    html = Path(result["report_html"]).read_text()
    assert "CLIP baselines" in html and "beats_zero_shot[accuracy]" in html
    assert f"{record['zero_shot']['accuracy']:.4f}" in html

    # the baseline's headline metrics sit next to the trained model's in the evaluate run
    run = mlflow.MlflowClient(f"sqlite:///{root / '.imgflow' / 'mlflow.db'}").get_run(result["run_id"])
    assert run.data.metrics["baseline_zeroshot_test_accuracy"] == pytest.approx(
        record["zero_shot"]["accuracy"]
    )
    assert run.data.metrics["baseline_linearprobe_test_accuracy"] == pytest.approx(
        record["linear_probe"]["accuracy"]
    )
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["accuracy"])
    assert run.data.tags["baseline_status"] == "ok"


# --------------------------------------------------------------------------- multi-label


def draw_two(labels: list[str], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Two coloured shapes (classes ``labels``), one in each half of the image, in random order."""
    grey = int(rng.integers(0, 256))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    halves = [(0, size // 2), (size // 2, size)]
    for cls, (lo, hi) in zip(labels, [halves[i] for i in rng.permutation(2)], strict=True):
        colour, shape = cls.split()
        r = int(rng.integers(6, 8))
        cx, cy = int(rng.integers(lo + r, hi - r + 1)), int(rng.integers(r, size - r))
        fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _pairs(n: int, rng: np.random.Generator) -> list[list[str]]:
    return [[CLASSES[i] for i in rng.choice(len(CLASSES), 2, replace=False)] for _ in range(n)]


def test_multilabel_zero_shot_scores_each_label_with_a_centred_sigmoid() -> None:
    img = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    text = np.eye(3)
    p = cb.zero_shot_label_probs(img, text, logit_scale=2.0)
    # cos row 0: (1, 0, 0), mean 1/3 -> sigmoid(2 * (cos - 1/3)); rows need not sum to 1
    np.testing.assert_allclose(p[0], 1 / (1 + np.exp(-2 * (np.array([1.0, 0.0, 0.0]) - 1 / 3))))
    assert p[0, 0] > 0.5 > p[0, 1] and not np.isclose(p[0].sum(), 1.0)
    # Platt scaling on val: a shared slope, one intercept per label, probabilities that mean something
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < [0.2, 0.5, 0.05]).astype(np.int8)
    logits = 8.0 * (y - 0.5) + rng.normal(scale=6.0, size=y.shape)  # over-confident raw scores
    cal = cb.fit_label_calibration(logits, y)
    assert cal is not None and 0 < cal.slope < 1  # the raw sigmoid is too sure of itself
    probs = cal(logits)
    assert abs(probs.mean() - y.mean()) < 0.03 and probs[:, 2].mean() < probs[:, 1].mean()
    assert cb.fit_label_calibration(logits[:0], y[:0]) is None


def test_multilabel_zero_shot_per_label_ap_is_far_above_prevalence(tiny_clip: dict) -> None:
    """Two shapes per image, the tiny CLIP trained on single shapes: each label is scored on its own,
    thresholds are tuned on half the images, metrics on the other half."""
    from components.task.multilabel import label_matrix, multilabel_metrics, tune_thresholds

    rng = np.random.default_rng(5)
    sets = _pairs(240, rng)
    y = label_matrix(sets, CLASSES)
    prevalence = 2 / len(CLASSES)

    def metrics(encoder: cb.ClipEncoder) -> dict:
        x = torch.stack(
            [encoder.preprocess(draw_two(s, np.random.default_rng(i))) for i, s in enumerate(sets)]
        )
        weights = cb.build_text_classifier(
            encoder, cb.class_prompts(CLASSES, cb.resolve_templates("imagenet80"))
        )
        probs = cb.zero_shot_label_probs(
            cb.encode_image_batches(encoder, x.split(64)), weights, encoder.logit_scale
        )
        thresholds = [t.threshold for t in tune_thresholds(y[:120], probs[:120], CLASSES)]
        return multilabel_metrics(y[120:], probs[120:], thresholds, CLASSES)

    m = metrics(tiny_clip["encoder"])
    assert m["mAP"] >= 3 * prevalence, m["mAP"]
    assert min(r["ap"] for r in m["per_label"]) > 1.5 * prevalence
    assert m["micro_f1"] > 0.4 and all(0 < r["threshold"] < 1 for r in m["per_label"])
    torch.manual_seed(1)
    untrained = metrics(cb.create_clip(TINY, None, random_init=True))
    assert untrained["mAP"] < m["mAP"] - 0.2  # the scores come from the learned weights


ATTRIBUTES = [*COLOURS, *SHAPES]
"""Multi-label classes of the stage test: every image carries its colour and its shape."""
ATTRIBUTE_PROMPTS = {c: [f"a photo of a {c} {s}." for s in SHAPES] for c in COLOURS} | {
    s: [f"a photo of a {c} {s}." for c in COLOURS] for s in SHAPES
}
"""baseline.class_prompts: an attribute's prompts name every shape (colour) it comes with."""


@pytest.fixture(scope="module")
def multilabel_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A CSV source of coloured shapes labelled ``<colour>|<shape>`` (ingested as multi-label),
    except 12 test images whose label set lacks their shape. Returns the root and image path -> the
    dropped label."""
    root = tmp_path_factory.mktemp("shapes-multilabel")
    rng = np.random.default_rng(21)
    (root / "images").mkdir()
    rows, dropped = [], {}
    for split, n in (("train", 180), ("test", 90)):
        for i in range(n):
            cls = CLASSES[i % len(CLASSES)]
            rel = f"images/{split}-{i}.png"
            draw(cls, rng).save(root / rel)
            colour, shape = cls.split()
            given = [colour, shape]
            if split == "test" and i < 12:
                given, dropped[rel] = [colour], shape
            rows.append({"path": rel, "labels": "|".join(given), "split": split})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    run_ingest(_params(root, source=f"csv:{root / 'labels.csv'}"), progress=False)
    return root, dropped


def test_multilabel_stage_tunes_thresholds_on_val_logs_map_and_flags_missing_labels(
    multilabel_project: tuple[Path, dict[str, str]], tiny_clip: dict
) -> None:
    from components.data.manifest import DataPaths, DatasetInfo, read_manifest
    from components.quality.ledger import read_ledger

    root, dropped = multilabel_project
    paths = DataPaths(root / "data")
    assert DatasetInfo.load(paths.dataset).task == "multilabel"
    params = _params(
        root, source=f"csv:{root / 'labels.csv'}", model=TINY, pretrained=str(tiny_clip["checkpoint"]),
        class_prompts=ATTRIBUTE_PROMPTS, probe_max_per_class=None, disagreement_min_confidence=0.8,
        batch_size=64, probe_C=None,
    )  # fmt: skip
    result = run_baseline(params)
    assert result["status"] == "ok" and result["task"] == "multilabel", result
    assert result["zero_shot_accuracy"] is None  # no accuracy for label sets: mAP and F1 instead
    assert result["zero_shot_mAP"] >= 0.8 and result["linear_probe_mAP"] >= 0.8, result
    assert result["zero_shot_micro_f1"] >= 0.7

    out = root / "outputs" / "baseline"
    record = json.loads((out / "baseline.json").read_text())
    manifest = read_manifest(paths.manifest)
    assert record["task"] == "multilabel" and record["threshold_split"] == "val"
    assert record["threshold_images"] == int((manifest["split"] == "val").sum()) > 0
    assert (
        set(record["zero_shot_thresholds"]) == set(ATTRIBUTES) and record["linear_probe_C"] in cb.PROBE_C_GRID
    )
    per_label = {r["label"]: r for r in record["zero_shot"]["per_label"]}
    assert all(per_label[c]["threshold"] == record["zero_shot_thresholds"][c] for c in ATTRIBUTES)
    assert record["zero_shot_calibration"]["slope"] > 0
    flat = json.loads((out / "metrics.json").read_text())
    assert flat["zero_shot_mAP"] == pytest.approx(record["zero_shot"]["mAP"])
    assert {"zero_shot_micro_f1", "linear_probe_macro_f1", "zero_shot_ap_circle"} <= set(flat)
    with open(out / "per_class.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(ATTRIBUTES) and {"zero_shot_ap", "linear_probe_threshold"} <= set(table[0])

    runs = {r.data.tags["baseline"]: r for r in _runs(root) if r.data.tags.get("task") == "multilabel"}
    assert set(runs) == {"zero_shot", "linear_probe"}
    assert runs["zero_shot"].data.metrics["test_mAP"] == pytest.approx(record["zero_shot"]["mAP"])
    assert "test_ap_red" in runs["linear_probe"].data.metrics

    # the test images whose label set lacks their shape: CLIP names the missing label, and little else
    source_of = dict(zip(manifest["image_id"], manifest["source_path"], strict=True))
    dropped_of = {
        i: next((v for p, v in dropped.items() if s.endswith(p)), None) for i, s in source_of.items()
    }
    with open(out / "disagreements.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["missing_labels"]]
    right = [r for r in rows if r["missing_labels"] == dropped_of[r["image_id"]]]
    assert len(right) >= 6, f"{len(right)} of {len(dropped)} dropped labels named"  # 8 seen; circles are hard
    assert len(right) >= 0.8 * len(rows)  # the flags are the corrupted images (12 of 270)
    assert all(set(r["clip_label"].split("|")) == {r["label"], r["missing_labels"]} for r in right)
    ledger = read_ledger(root / ".imgflow" / "audit-ledger").set_index("image_id")
    for r in right:
        assert ledger.loc[r["image_id"], "missing_labels"] == r["missing_labels"]
        assert ledger.loc[r["image_id"], "issue"] == "clip_disagreement"

    # the optional gate compares mAP and each label's AP
    (na,) = cb.check_beats_baseline(record["zero_shot"], {"status": "skipped", "reason": "x"}, margin=0.0)
    assert not na.passed and cb.is_not_applicable(na)
    gates = cb.check_beats_baseline(record["linear_probe"], record, margin=0.0)
    assert gates[0].name == "beats_zero_shot[mAP]" and len(gates) == 1 + len(ATTRIBUTES)
    assert gates[0].passed == (record["linear_probe"]["mAP"] >= record["zero_shot"]["mAP"])
