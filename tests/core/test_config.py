"""params.yaml loading: typed, frozen, unknown keys and bad values are clear errors."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from components.core.config import load_params
from components.core.errors import ConfigError
from tests.conftest import REPO


def test_repo_params_load_and_match_defaults() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.train.model == "imgflow_cnn_avgmax" and p.ingest.source == "fashion-mnist"
    assert p.validate_.allowed_modes == ("L", "RGB") and p.register_.model_name == "imgflow-fashion-mnist"


def test_overrides_are_parsed_as_yaml() -> None:
    p = load_params(
        REPO / "params.yaml", ["train.epochs=3", "train.scale=[0.5, 1.0]", "ingest.classes=[a, b]"]
    )
    assert p.train.epochs == 3 and p.train.scale == (0.5, 1.0) and p.ingest.classes == ("a", "b")


def test_config_is_frozen() -> None:
    p = load_params(REPO / "params.yaml")
    with pytest.raises(pydantic.ValidationError):
        p.train.epochs = 7  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("trian.epochs=3", "trian: unknown key"),
        ("train.epochs=zero", "train.epochs"),
        ("train.epochs=0", "greater than or equal to 1"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("split.val_fraction=0.95", "val_fraction + test_fraction"),
        ("epochs", "expected section.key=value"),
        ("epochs=3", "must name a section and a key"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        load_params(REPO / "params.yaml", [override])


def test_missing_or_bad_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(bad)


def test_fingerprint_changes_with_params() -> None:
    a = load_params(REPO / "params.yaml")
    assert a.fingerprint() == load_params(REPO / "params.yaml").fingerprint()
    assert a.fingerprint() != load_params(REPO / "params.yaml", ["train.lr=0.1"]).fingerprint()


def test_a_bare_off_is_the_choice_off_wherever_off_is_a_choice(tmp_path: Path) -> None:
    """YAML 1.1 reads ``off`` as false: ``train.cache: off`` in a file or ``--set train.amp=off`` mean
    "off" for settings whose choices include it; a real boolean setting keeps false."""
    from components.core.config import load_params

    file = tmp_path / "params.yaml"
    file.write_text("train:\n  cache: off\nevaluate:\n  robustness:\n    amp: off\n")
    params = load_params(file, ["train.amp=off", "serve.backoff=off", "gates.levels={max_ece: off}",
                                "train.channels_last=off"])  # fmt: skip
    assert (params.train.cache, params.train.amp, params.evaluate.robustness.amp) == ("off", "off", "off")
    assert params.serve.backoff == "off" and params.gates.levels == {"max_ece": "off"}
    assert params.train.channels_last is False
