"""Typed, frozen configuration loaded once from ``params.yaml``.

``params.yaml`` is the single source of parameters, one section per stage (the DVC
example-project layout). Entry points call :func:`load_params`; components receive explicit
arguments or one of these section objects and never read YAML or the environment themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.errors import ConfigError


class _Section(BaseModel):
    """Base of every section: immutable, and an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ProjectConfig(_Section):
    name: str = "fashion-mnist"
    seed: int = 42
    data_dir: Path = Path("data")
    output_dir: Path = Path("outputs")
    state_dir: Path = Path(".imgflow")


class IngestConfig(_Section):
    source: str = "fashion-mnist"
    """``fashion-mnist``, ``imagefolder:<dir>`` or ``csv:<file>``."""
    task: Literal["singlelabel", "multilabel"] = "singlelabel"
    classes: tuple[str, ...] | None = None
    """Declared class set; rows with another label are quarantined. None: inferred from data."""
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    download: bool = True
    """When the Fashion-MNIST files are absent, download them (checksums verified)."""
    max_per_class: int | None = Field(default=None, ge=1)
    """Keep at most this many images per class and source split (quick runs, tests)."""
    max_pixels: int = Field(default=89_478_485, ge=1)
    """Images with more pixels are quarantined (decompression-bomb guard)."""


class SplitConfig(_Section):
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Used only when the source has no official test split."""

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (something must be left to train on)")
        return self


class ValidateConfig(_Section):
    min_width: int = Field(default=8, ge=1)
    max_width: int = Field(default=8192, ge=1)
    min_height: int = Field(default=8, ge=1)
    max_height: int = Field(default=8192, ge=1)
    allowed_modes: tuple[str, ...] = ("L", "RGB")
    required_splits: tuple[str, ...] = ("train", "val", "test")


class TrainConfig(_Section):
    model: str = "imgflow_cnn"
    """Any timm model name (``timm.list_models()``), or imgflow's own ``imgflow_cnn``."""
    pretrained: bool = False
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    hflip: float = Field(default=0.5, ge=0, le=1)
    """Horizontal-flip probability of the training transform."""
    scale: tuple[float, float] = (0.85, 1.0)
    """Random-resized-crop area range of the training transform."""
    input_size: int | None = Field(default=None, ge=8)
    """Square input side; None: the model's own default."""
    in_chans: int | None = Field(default=None, ge=1, le=4)
    """Input channels; None: 1 for an all-grey dataset, else 3."""
    workers: int = Field(default=2, ge=1)
    """Ray Train workers (data-parallel)."""
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    max_failures: int = Field(default=1, ge=0)
    """Worker failures Ray Train recovers from (restart from the last checkpoint)."""
    loader_workers: int = Field(default=0, ge=0)
    deterministic: bool = False

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool_to_str(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class GatesConfig(_Section):
    min_accuracy: float = Field(default=0.90, ge=0, le=1)
    min_class_recall: float = Field(default=0.60, ge=0, le=1)


class EvaluateConfig(_Section):
    batch_size: int = Field(default=512, ge=1)


class RegisterConfig(_Section):
    model_name: str = "imgflow-fashion-mnist"
    experiment: str = "imgflow"
    tracking_uri: str | None = None
    """None: ``$MLFLOW_TRACKING_URI``, else sqlite under ``project.state_dir``."""


class Params(_Section):
    project: ProjectConfig = ProjectConfig()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gates: GatesConfig = GatesConfig()
    register_: RegisterConfig = Field(default=RegisterConfig(), alias="register")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved parameters, JSON-safe, with the YAML section names."""
        return json.loads(self.model_dump_json(by_alias=True))

    def fingerprint(self) -> str:
        """Short stable hash of the resolved parameters (tags, run names)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: expected section.key=value, e.g. train.epochs=3")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"bad --set {item!r}: the key must name a section and a key, e.g. train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad --set {item!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw params mapping (a new dict is returned)."""
    out = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad --set {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (check the spelling; see params.yaml for the keys)")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def params_from_dict(raw: dict[str, Any], *, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read ``params.yaml`` (a missing file means all defaults), apply overrides, validate."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    elif path != Path("params.yaml"):
        raise ConfigError(f"params file {path} does not exist")
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return params_from_dict(apply_overrides(raw, overrides), source=source)
