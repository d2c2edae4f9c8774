"""BIFCallback's argument and label checks (argument_checks.py, example_labels.py): errors name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_bif.lightning.argument_checks import CALIBRATION_OPTIONS, calibration_options, check_options
from lightning_bif.lightning.example_labels import display_texts, labels_per_example

VALID = dict(if_exists="error", tensorboard=True, min_split_half=None, num_threads=None, horizon="interval",
             loss_fn=None, probe_fn=None)


def test_valid_options_pass() -> None:
    check_options(**VALID)
    check_options(**dict(VALID, if_exists="resume", min_split_half=-1, num_threads=2, horizon=5, loss_fn=len,
                         tensorboard=False))


@pytest.mark.parametrize(("name", "value"), [
    ("if_exists", "append"), ("min_split_half", 1.5), ("min_split_half", True), ("num_threads", 0),
    ("num_threads", True), ("horizon", 0), ("horizon", "forever"), ("horizon", True), ("loss_fn", "mse"),
    ("probe_fn", 3), ("tensorboard", ["no_such_chart"]),
])
def test_an_option_out_of_range_is_named_in_the_error(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"BIFCallback\({name}="):
        check_options(**dict(VALID, **{name: value}))


def test_calibration_options_take_a_flag_or_calibrates_own_keywords() -> None:
    assert calibration_options(False) is None and calibration_options(True) == {}
    assert "device" not in CALIBRATION_OPTIONS and "cache" not in CALIBRATION_OPTIONS
    name = CALIBRATION_OPTIONS[0]
    assert calibration_options({name: 3}) == {name: 3}
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bogus'\]"):
        calibration_options({"bogus": 1})
    with pytest.raises(ValueError, match="takes True/False or a dict"):
        calibration_options("yes")  # type: ignore[arg-type]


def test_group_labels_are_one_int64_or_str_label_per_example() -> None:
    assert labels_per_example(None, 3, "train_groups", "train") is None
    ints = labels_per_example(torch.tensor([2, 0, 2]), 3, "train_groups", "train")
    assert ints.dtype == np.int64 and ints.tolist() == [2, 0, 2]
    assert labels_per_example([True, False], 2, "probe_groups", "probes").dtype == np.int64
    assert labels_per_example(["a", "b"], 2, "probe_groups", "probes").tolist() == ["a", "b"]
    with pytest.raises(ValueError, match=r"probe_groups=...\) needs one label per example of probes \(3\)"):
        labels_per_example([0, 1], 3, "probe_groups", "probes")
    with pytest.raises(ValueError, match=r"train_groups=...\) needs labels that are all integers or all strings"):
        labels_per_example([0, "a"], 2, "train_groups", "train")  # not silently the strings "0" and "a"
    with pytest.raises(ValueError, match="got shape"):
        labels_per_example(np.zeros((3, 1)), 3, "train_groups", "train")


def test_display_texts_are_one_string_or_token_list_per_example() -> None:
    assert display_texts(None, 2, "train_text", "train", nested=False) is None
    assert display_texts(("a", "b"), 2, "train_text", "train", nested=False) == ["a", "b"]
    assert display_texts([("x", "y"), ["z"]], 2, "probe_tokens", "probes", nested=True) == [["x", "y"], ["z"]]
    for bad, nested in (("ab", False), (["a"], False), ([1, "b"], False), (["ab", "cd"], True), ([["a"], [2]], True)):
        with pytest.raises(ValueError, match="for each of the 2 examples"):
            display_texts(bad, 2, "texts", "train", nested=nested)
