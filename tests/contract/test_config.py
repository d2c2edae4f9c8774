"""SGLDConfig (lightning_bif/config.py): validation that names the field, copies, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lightning_bif import SGLDConfig


def test_defaults_are_valid_and_a_config_round_trips_through_dict_and_json() -> None:
    config = SGLDConfig(chains=4, draws=10, step_size=1e-4, sample_params=["layer.*", "head.weight"])
    assert config.sample_params == ("layer.*", "head.weight")  # lists become tuples
    assert json.loads(config.to_json())["sample_params"] == ["layer.*", "head.weight"]
    assert SGLDConfig.from_dict(config.to_dict()) == config == SGLDConfig.from_json(config.to_json())
    assert SGLDConfig(sample_params="bias").sample_params == ("bias",)
    assert SGLDConfig.from_json(SGLDConfig().to_json()) == SGLDConfig()


def test_replace_validates_again_and_unknown_keys_are_refused() -> None:
    config = SGLDConfig(chains=4)
    assert config.replace(chains=8).chains == 8 and config.chains == 4
    with pytest.raises(ValueError, match=r"SGLDConfig\.chains must be a positive integer"):
        config.replace(chains=0)
    with pytest.raises(ValueError, match=r"Unknown SGLDConfig fields \['chain'\]"):
        SGLDConfig.from_dict({"chain": 4})


# test_estimator.py checks the sampler's fields (chains, draws, thin, burn_in, step size, nβ, γ, λ, batches).
@pytest.mark.parametrize(("field", "value"), [
    ("draws", 1), ("preconditioner_rank", 0), ("preconditioner_damping", 0.0), ("autocast", "int8"),
    ("per_token", 1), ("max_token_entries", 0), ("control_variates", "on"),
])
def test_a_value_out_of_range_is_an_error_naming_its_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SGLDConfig\.{field}"):
        SGLDConfig(**{field: value})


def test_fields_that_only_make_sense_together() -> None:
    with pytest.raises(ValueError, match="set together or not at all"):
        SGLDConfig(horizon_steps=10)
    horizon = SGLDConfig(horizon_steps=10, learning_rate=0.1, momentum=0.9)
    assert dataclasses.asdict(horizon)["horizon_steps"] == 10
    with pytest.raises(ValueError, match=r"SGLDConfig\.momentum"):
        SGLDConfig(horizon_steps=10, learning_rate=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="control_variates=True"):
        SGLDConfig(control_variates=True, per_token=True)
