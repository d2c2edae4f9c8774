"""TensorBoard sink: the event file holds the group means of the HDF5 log, diagnostics and a heatmap."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_log import make_identity, make_result, record
from torch.utils.tensorboard import SummaryWriter

from lightning_bif import open_log
from lightning_bif.log import LogWriter
from lightning_bif.tensorboard import HARMFUL_RGB, HELPFUL_RGB, NAN_RGB, TensorBoardSink


def read_events(directory: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(directory), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0, event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
    })
    events.Reload()
    return events


def test_scalars_are_the_group_means_of_the_logged_snapshots(tmp_path: Path) -> None:
    identity = make_identity()  # train groups 0,1,2 (N=8); probe groups [0, 1, 1]
    records = [record(10), record(20, "failed", message="boom"), record(30, "diverged"), record(45)]
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer, identity, train_group_names={0: "zeros", 1: "ones"},
                           probe_group_names={1: "test set"})
    with LogWriter(tmp_path / "bif.h5", identity) as log_writer:
        for r in records:
            log_writer.append(r)
            sink.write(r.step, r)
    writer.close()

    events = read_events(tmp_path / "tb")
    log = open_log(tmp_path / "bif.h5")
    train_names, probe_names = {0: "zeros", 1: "ones", 2: "2"}, {0: "0", 1: "test_set"}
    expected_tags = {f"bif/{probe_names[p]}/{train_names[t]}" for p in (0, 1) for t in (0, 1, 2)}
    assert set(sink.scalar_tags) == expected_tags
    diag_tags = {"bif_diag/" + name for name in
                 ("sampling_loss", "loss_rise", "split_half", "ess", "diverged_chains", "duration_s", "step_size")}
    assert set(events.Tags()["scalars"]) == expected_tags | diag_tags

    ok_rows = [row for row in range(len(log)) if log.status[row] != "failed"]
    for p, probe_name in probe_names.items():
        for t, train_name in train_names.items():
            scalars = events.Scalars(f"bif/{probe_name}/{train_name}")
            assert [s.step for s in scalars] == [int(log.steps[row]) for row in ok_rows]
            for scalar, row in zip(scalars, ok_rows, strict=True):
                block = log.influence[row][log.probe_groups == p][:, log.train_groups == t]
                assert scalar.value == pytest.approx(block.astype(np.float64).mean(), rel=1e-5, abs=1e-7)

    assert [s.value for s in events.Scalars("bif_diag/duration_s")] == pytest.approx(log.duration_s.tolist())
    for name, values in (("split_half", log.split_half), ("loss_rise", log.loss_rise), ("ess", log.ess),
                         ("step_size", log.step_size)):
        assert [s.value for s in events.Scalars(f"bif_diag/{name}")] == pytest.approx(values[ok_rows].tolist())
    assert [s.value for s in events.Scalars("bif_diag/diverged_chains")] == [
        float(log.diverged[row].sum()) for row in ok_rows]
    assert [s.value for s in events.Scalars("bif_diag/sampling_loss")] == pytest.approx(
        [float(log.sampling_loss[row].astype(np.float64).mean()) for row in ok_rows], rel=1e-5)
    histograms = events.Histograms("bif/influence_hist")
    assert [h.step for h in histograms] == [10, 30, 45]
    assert all(h.histogram_value.num == log.influence.shape[1] * log.influence.shape[2] for h in histograms)
    assert [image.step for image in events.Images("bif/influence_heatmap")] == [10, 30, 45]

    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert set(charts) == {"probes 0", "probes test_set"}
    for title, regexes in charts.items():
        matched = {tag for tag in expected_tags if any(re.search(regex, tag) for regex in regexes)}
        assert matched == {tag for tag in expected_tags if tag.split("/")[1] == title.removeprefix("probes ")}


def test_heatmap_sorts_by_group_and_colours_helpful_blue_harmful_red(tmp_path: Path) -> None:
    # Probes 0 and 2 are group "a", probe 1 group "b"; train example i is in group i % 2.
    identity = make_identity(probe_groups=["a", "b", "a"], train_groups=np.arange(8) % 2)
    result = make_result(0)
    influence = torch.where(torch.arange(8) % 2 == 0, -1.0, 1.0).repeat(3, 1)  # even train: helpful
    influence[1] = 0.0
    influence[2, 1] = float("nan")
    result.influence = influence
    writer = SummaryWriter(str(tmp_path / "tb"))
    TensorBoardSink(writer, identity).write(7, record(7, result=result))
    writer.close()

    (event,) = read_events(tmp_path / "tb").Images("bif/influence_heatmap")
    image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    height, width, _ = image.shape
    assert height >= 3 and width >= 8 and height % 3 == 0 and width % 8 == 0
    cells = image[:: height // 3, :: width // 8]  # one pixel per (probe, train) cell, sorted by group
    # Rows: probes 0, 2 (group a) then 1 (group b). Columns: even train examples, then odd ones.
    np.testing.assert_array_equal(cells[0, :4], np.tile(HELPFUL_RGB, (4, 1)))
    np.testing.assert_array_equal(cells[0, 4:], np.tile(HARMFUL_RGB, (4, 1)))
    np.testing.assert_array_equal(cells[1, 4], NAN_RGB)  # probe 2, train 1
    assert (cells[2] > 240).all()  # probe 1: zero influence is white


def test_failed_snapshot_writes_only_its_duration_and_step_size(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer, make_identity(train_groups=None, probe_groups=None))
    assert sink.scalar_tags == ["bif/all/all"]
    sink.write(3, record(3, "failed", message="out of memory"))
    failed = record(4, "failed", message="out of memory")
    failed.step_size = 2e-4
    sink.write(4, failed)
    writer.close()
    events = read_events(tmp_path / "tb")
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["bif_diag/duration_s", "bif_diag/step_size"]
    assert tags["images"] == [] and tags["histograms"] == []
    assert [(s.step, s.value) for s in events.Scalars("bif_diag/step_size")] == [(4, pytest.approx(2e-4))]
