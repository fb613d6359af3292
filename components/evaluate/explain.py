"""Grad-CAM heat maps (Selvaraju et al., ICCV 2017) for CNNs and ViTs, and the gate report's gallery.

Hand-written (a few dozen lines; ``grad-cam`` and ``captum`` are not in the lock): the activations A
of a target layer and the gradient of the class score with respect to them give one weight per
channel (the spatial mean of the gradient); the map is ReLU(sum_c w_c A_c), upsampled to the input
and scaled to [0, 1] per image.

Target layer: for a CNN the last ``nn.Conv2d`` of the model; for a ViT the input of the last block's
attention (``blocks[-1].norm1``, as pytorch-grad-cam does — after the last block only the class
token reaches the head, so gradients there would not reach the patch tokens). Its tokens lose the
model's ``num_prefix_tokens`` (class, distillation, register tokens) and are reshaped on the model's
patch grid (``model.patch_embed.grid_size``): a 32-px ViT with 8-px patches has a 4x4 map, not 14x14.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from components.core import report as kit
from components.core.errors import ConfigError
from components.model.features import base_model


@dataclass(frozen=True)
class CamLayer:
    """Where Grad-CAM reads activations, and how they become a (B, C, h, w) map."""

    module: nn.Module
    to_map: Callable[[torch.Tensor], torch.Tensor]
    name: str


def _token_grid(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    gh, gw = (int(v) for v in model.patch_embed.grid_size)  # type: ignore[union-attr]

    def to_map(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:]
        if patches.shape[1] != gh * gw:
            raise ConfigError(f"{patches.shape[1]} patch tokens do not fill the {gh}x{gw} patch grid")
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)

    return to_map


def cam_layer(model: nn.Module) -> CamLayer:
    """The target layer of a timm model (see the module docstring)."""
    net = base_model(model)
    blocks = getattr(net, "blocks", None)
    if hasattr(net, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        last = blocks[-1]
        module = getattr(last, "norm1", last)
        return CamLayer(module, _token_grid(net), f"blocks.{len(blocks) - 1}.norm1")
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(net).__name__}: no conv layer nor ViT blocks to explain with Grad-CAM")
    name, module = convs[-1]
    return CamLayer(module, lambda a: a, name)


def grad_cam(
    model: nn.Module, x: torch.Tensor, *, target: Sequence[int] | None = None, upsample: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (B, C, H, W) preprocessed images -> (heat maps (B, H, W) in [0, 1], explained class (B,),
    its softmax probability (B,)). ``target``: the class to explain per image (default: the top one);
    ``upsample=False``: the maps at the target layer's own resolution (B, h, w)."""
    net = base_model(model).eval()
    layer = cam_layer(net)
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = layer.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = net(x.detach().clone().requires_grad_(True))
            cls = logits.argmax(1) if target is None else torch.as_tensor(list(target), device=logits.device)
            net.zero_grad(set_to_none=True)
            logits.gather(1, cls[:, None]).sum().backward()
    finally:
        handle.remove()
    acts, grads = layer.to_map(store["a"].detach()), layer.to_map(store["a"].grad.detach())  # type: ignore[union-attr]
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    if upsample:
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    top = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    probs = logits.detach().softmax(1).gather(1, cls[:, None])[:, 0]
    return (cam / top).cpu().numpy(), cls.cpu().numpy(), probs.cpu().numpy()


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Preprocessed (B, C, H, W) images back to (B, H, W, 3) uint8 for display."""
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)
    x01 = (x.detach().cpu() * s + m).clamp(0, 1)
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    return (x01[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def heat_overlay(image: np.ndarray, cam: np.ndarray, *, side: int = 112, alpha: float = 0.5) -> Image.Image:
    """The heat map (jet colours) blended over the image, ``side`` px square: image (H, W, 3) uint8,
    cam (H, W) in [0, 1]."""
    from matplotlib import colormaps

    img = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
    heat = (colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.blend(img, Image.fromarray(heat).resize((side, side), Image.Resampling.BILINEAR), alpha)


def overlay(image: np.ndarray, cam: np.ndarray, *, side: int = 112, alpha: float = 0.5) -> Image.Image:
    """The image and its heat map over it, side by side (what ``imgflow explain`` writes)."""
    canvas = Image.new("RGB", (2 * side + 4, side), "white")
    canvas.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), (0, 0))
    canvas.paste(heat_overlay(image, cam, side=side, alpha=alpha), (side + 4, 0))
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- gate report gallery


@dataclass(frozen=True)
class Explained:
    """One test image of the gallery: why it is shown, what it is, what the model said."""

    group: str
    """``confident error`` or ``<true> -> <predicted>`` (a most-confused pair)."""
    index: int
    """Row of the test split."""
    true: str
    predicted: str
    confidence: float
    file: str
    """The heat-map overlay's file name; the plain image is ``<stem>_image.png`` beside it."""
    png: bytes = field(repr=False, default=b"")
    image_png: bytes = field(repr=False, default=b"")

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "index": self.index, "true": self.true, "predicted": self.predicted,
                "confidence": self.confidence, "file": self.file}  # fmt: skip


@dataclass(frozen=True)
class Gallery:
    """Grad-CAM overlays of the most confident test errors and of each most-confused class pair."""

    items: tuple[Explained, ...]
    layer: str
    status: str = "ok"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "layer": self.layer,
                "items": [e.to_dict() for e in self.items]}  # fmt: skip

    def write(self, out_dir: Path) -> dict[str, Path]:
        """The overlays as ``<out_dir>/explanations/<file>`` PNGs; returns them by name."""
        folder = Path(out_dir) / "explanations"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for e in self.items:
            stem = Path(e.file).stem
            (folder / e.file).write_bytes(e.png)
            (folder / f"{stem}_image.png").write_bytes(e.image_png)
            paths[f"explain_{stem}"] = folder / e.file
            paths[f"explain_{stem}_image"] = folder / f"{stem}_image.png"
        return paths


def pick_examples(
    probs: np.ndarray, targets: np.ndarray, pairs: Sequence[Mapping[str, Any]], classes: Sequence[str],
    *, errors: int = 8, per_pair: int = 2,
) -> list[tuple[str, int]]:  # fmt: skip
    """(group, test row) to explain: the ``errors`` most confident mistakes, then the ``per_pair``
    most confident images of each confused pair (``{"true", "predicted"}`` class names)."""
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != targets)
    picked = [("confident error", int(i)) for i in wrong[np.argsort(-conf[wrong], kind="stable")][:errors]]
    index = {c: i for i, c in enumerate(classes)}
    for pair in pairs:
        t, p = index.get(str(pair.get("true"))), index.get(str(pair.get("predicted")))
        if t is None or p is None:
            continue
        cell = np.flatnonzero((targets == t) & (pred == p))
        shown = {j for _, j in picked}  # each image once
        fresh = [int(i) for i in cell[np.argsort(-conf[cell], kind="stable")] if int(i) not in shown]
        picked += [(f"{classes[t]} -> {classes[p]}", i) for i in fresh[:per_pair]]
    return picked


def build_gallery(
    model: nn.Module,
    load: Callable[[Sequence[int]], torch.Tensor],
    picks: Sequence[tuple[str, int]],
    *,
    probs: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
) -> Gallery:
    """Grad-CAM of the predicted class for each picked test row; ``load(rows)`` gives their
    preprocessed (B, C, H, W) images."""
    layer = cam_layer(model).name
    if not picks:
        return Gallery((), layer, status="none", reason="no test errors to explain")
    rows = [i for _, i in picks]
    x = load(rows)
    cams, _, _ = grad_cam(model, x, target=[int(probs[i].argmax()) for i in rows])
    shown = to_display(x, mean, std)
    items = []
    for k, ((group, i), cam, img) in enumerate(zip(picks, cams, shown, strict=True)):
        items.append(Explained(
            group=group, index=i, true=classes[int(targets[i])], predicted=classes[int(probs[i].argmax())],
            confidence=float(probs[i].max()), file=f"{k:02d}_test{i}.png", png=png_bytes(heat_overlay(img, cam)),
            image_png=png_bytes(Image.fromarray(img)),
        ))  # fmt: skip
    return Gallery(tuple(items), layer)


def _thumb(path: Path | None, alt: str) -> kit.Html:
    """An inlined thumbnail (the kit's cards draw their images 64 px square, side by side)."""
    if path is None or not Path(path).is_file():
        return kit.Html("")
    return kit.Html(f'<img alt="{kit.esc(alt)}" src="{kit.data_uri(Path(path).read_bytes())}">')


def gallery_section(data: Mapping[str, Any] | None, images: Mapping[str, Path]) -> kit.Section | None:
    """The gate report's "Explanations" section from :meth:`Gallery.to_dict`, the overlays (the files
    :meth:`Gallery.write` returned, by name) inlined."""
    if not data:
        return None
    if data.get("status") != "ok":
        return kit.section("Explanations", kit.note(data.get("reason", "not computed")))
    cards = [
        kit.join([_thumb(images.get(f"explain_{Path(e['file']).stem}_image"), f"test image {e['index']}"),
                  _thumb(images.get(f"explain_{Path(e['file']).stem}"), f"Grad-CAM of test image {e['index']}"),
                  kit.paragraph(f"{e['group']}: true {e['true']}, predicted {e['predicted']} "
                                f"({e['confidence']:.0%})")])
        for e in data["items"]
    ]  # fmt: skip
    note = (
        f"Grad-CAM at {data.get('layer')}: left the test image, right where the predicted class's score "
        "came from (red: most). First the most confident mistakes, then the most confused class pairs."
    )
    return kit.section("Explanations", kit.paragraph(note), kit.gallery(cards, wide=True))
