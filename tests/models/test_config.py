"""Config loading: YAML + dotted overrides, validated; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import TrainerConfig
from stream.config import ConfigError, MemstreamConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_default_yaml_equals_built_in_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == MemstreamConfig()


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        ["model.use_pkm=false", "trainer.batch_size=128", "model.pkm.k=8", "trainer.device=cuda"],
    )
    assert cfg.model.use_pkm is False and cfg.trainer.batch_size == 128
    assert cfg.model.pkm.k == 8 and cfg.trainer.device == "cuda"


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.pkm.kk=3", "model.pkm.kk"),
        ("trainer.batch_size=abc", "trainer.batch_size"),
        ("model.sample_rate=1.5", "model.sample_rate"),
        ("kafka.x=1", "kafka"),
    ],
)
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_shape_rules_are_checked():
    with pytest.raises(ConfigError, match="num_tokens"):
        load_config(None, ["model.num_queries=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["model.use_pkm"])
    with pytest.raises(ConfigError, match="rating_thresholds"):
        load_config(None, ["model.rating_thresholds=[3.0, 3.0]"])
    with pytest.raises(ConfigError, match="ridge_lambda"):
        load_config(None, ["model.ridge_lambda=0"])


def test_component_class_defaults_are_the_default_runs():
    """A component built from its own config class is the one the default run builds
    (every class default is what configs/default.yaml runs, no override in ModelConfig)."""
    from memory_bank.history import HistoryConfig
    from memory_bank.lemur import BankConfig, EncoderConfig
    from memory_bank.lmn import LMNConfig
    from memory_bank.pkm import PKMConfig
    from models.config import FeatureConfig, ModelConfig, TrainerConfig

    run = load_config(ROOT / "configs" / "default.yaml")
    m = run.model
    for cls, used in [
        (FeatureConfig, m.features),
        (BankConfig, m.bank),
        (EncoderConfig, m.encoder),
        (LMNConfig, m.lmn),
        (PKMConfig, m.pkm),
        (HistoryConfig, m.history),
        (ModelConfig, m),
        (TrainerConfig, run.trainer),
    ]:
        assert cls() == used, cls.__name__
    assert m.pkm.k == 16 and m.lmn.query_norm == "batchnorm" and m.encoder.sparse_embedding


def test_partial_nested_override_keeps_the_other_defaults():
    base = MemstreamConfig()
    cfg = load_config(None, ["model.pkm.k=8"])
    assert cfg.model.pkm == base.model.pkm.model_copy(update={"k": 8})
    assert cfg.model.model_copy(update={"pkm": base.model.pkm}) == base.model


def test_trainer_device_auto_resolves_and_bad_devices_are_refused():
    import pydantic
    import torch

    from models.config import ModelConfig, TrainerConfig
    from models.online import OnlineTrainer

    small = ModelConfig.model_validate({"use_bank": False, "use_lmn": False, "use_pkm": False})
    t = OnlineTrainer(small, TrainerConfig(device="auto"))
    assert t.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(pydantic.ValidationError, match="device"):
        TrainerConfig(device="gpu0")


def test_micro_batch_doubles_up_to_batch_size_over_the_ramp():
    t = TrainerConfig(batch_size=512, min_batch_size=64, batch_ramp_events=32_000)
    sizes = {n: t.micro_batch_size(n) for n in (0, 7_999, 8_000, 15_999, 16_000, 31_999, 32_000, 10**7)}
    assert sizes == {
        0: 64,
        7_999: 64,
        8_000: 128,
        15_999: 128,
        16_000: 256,
        31_999: 256,
        32_000: 512,
        10**7: 512,
    }
    assert TrainerConfig(batch_ramp_events=0).micro_batch_size(0) == 512  # no ramp
    assert TrainerConfig(batch_size=48).micro_batch_size(0) == 48  # never above batch_size
    assert TrainerConfig(batch_size=100).micro_batch_size(0) == 64  # never below the minimum
