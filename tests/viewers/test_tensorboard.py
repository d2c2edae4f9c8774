"""TensorBoard sink: group curves in a run per train group, a labelled matrix figure, few diagnostics by default."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import make_identity, record
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_bif import open_log
from lightning_bif.log import LogWriter
from lightning_bif.viewers.tensorboard import DEFAULT_CHARTS, OPTIONAL_CHARTS, TensorBoardSink, check_charts


def read_events(directory: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(directory), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0, event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
    })
    events.Reload()
    return events


def write_run(tmp_path: Path, records, charts=True, **names) -> TensorBoardSink:
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer, make_identity(), charts=charts, log_path=tmp_path / "bif.h5", **names)
    with LogWriter(tmp_path / "bif.h5", make_identity()) as log_writer:
        for r in records:
            log_writer.append(r)
            sink.write(r)
    sink.close()
    writer.close()
    return sink


def test_group_curves_are_one_run_per_train_group_holding_nbeta_times_the_logged_group_means(tmp_path: Path) -> None:
    # make_identity: train groups 0,1,2 (N=8); probe groups [0, 1, 1]
    records = [record(10), record(20, "failed", message="boom"), record(30, "diverged"), record(45)]
    sink = write_run(tmp_path, records, train_group_names={0: "zeros", 1: "ones"}, probe_group_names={1: "test set"})
    log = open_log(tmp_path / "bif.h5")
    assert [Path(run).name for run in sink.group_runs] == ["train_zeros", "train_ones", "train_2"]
    assert sink.group_tags == ["bif_x_nbeta/probes_0", "bif_x_nbeta/probes_test_set"]
    ok_rows = [row for row in range(len(log)) if log.status[row] != "failed"]
    for t, run in enumerate(sink.group_runs):
        events = read_events(Path(run))
        assert sorted(events.Tags()["scalars"]) == sorted(sink.group_tags)
        for p, tag in enumerate(sink.group_tags):
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [int(log.steps[row]) for row in ok_rows]
            for scalar, row in zip(scalars, ok_rows, strict=True):
                block = log.influence[row][log.probe_groups == p][:, log.train_groups == t]
                expected = log.nbeta[row] * block.astype(np.float64).mean()
                assert scalar.value == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_default_charts_are_few_and_the_matrix_is_a_labelled_figure(tmp_path: Path) -> None:
    records = [record(10), record(20, "failed", message="boom"), record(30, "diverged"), record(45)]
    write_run(tmp_path, records)
    events = read_events(tmp_path / "tb")
    log = open_log(tmp_path / "bif.h5")
    ok_rows = [row for row in range(len(log)) if log.status[row] != "failed"]
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["bif_diag/diverged_chains", "bif_diag/loss_rise", "bif_diag/split_half"]
    assert tags["histograms"] == []
    for name, values in (("split_half", log.split_half), ("loss_rise", log.loss_rise)):
        assert [s.value for s in events.Scalars(f"bif_diag/{name}")] == pytest.approx(values[ok_rows].tolist())
    assert [s.value for s in events.Scalars("bif_diag/diverged_chains")] == [
        float(log.diverged[row].sum()) for row in ok_rows]
    images = events.Images("bif/matrix")
    assert [image.step for image in images] == [10, 30, 45]
    picture = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
    # A figure (axes, labels, colour bar), not the 3 x 8 matrix blown up: wide, with blue and red cells.
    assert picture.shape[0] >= 200 and picture.shape[1] >= 400
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 120)
    red = (picture[..., 0] > 150) & (picture[..., 2] < 120)
    assert blue.sum() > 100 and red.sum() > 100
    statuses = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("bif_diag/status/text_summary")]
    assert statuses == [(20, "step 20: **failed** — boom"), (30, "step 30: **diverged**")]


def test_opt_in_charts_write_the_other_diagnostics_and_the_histogram(tmp_path: Path) -> None:
    records = [record(10), record(20, "failed", message="boom")]
    write_run(tmp_path, records, charts=["duration_s", "step_size", "ess", "sampling_loss", "histogram"])
    events = read_events(tmp_path / "tb")
    log = open_log(tmp_path / "bif.h5")
    assert sorted(events.Tags()["scalars"]) == [f"bif_diag/{name}" for name in
                                                ("duration_s", "ess", "sampling_loss", "step_size")]
    assert events.Tags()["images"] == [] and not (tmp_path / "tb" / "train_0").exists()
    assert [s.value for s in events.Scalars("bif_diag/duration_s")] == pytest.approx(log.duration_s.tolist())
    assert [s.value for s in events.Scalars("bif_diag/ess")] == pytest.approx([log.ess[0]])
    assert [s.value for s in events.Scalars("bif_diag/sampling_loss")] == pytest.approx(
        [float(log.sampling_loss[0].astype(np.float64).mean())], rel=1e-5)
    (histogram,) = events.Histograms("bif/influence_hist")
    assert histogram.step == 10 and histogram.histogram_value.num == log.influence.shape[1] * log.influence.shape[2]


def test_groups_figure_draws_the_log_so_far_at_each_snapshot_with_an_estimate(tmp_path: Path) -> None:
    write_run(tmp_path, [record(10), record(20, "failed", message="boom"), record(40)], charts=["groups_figure"])
    images = read_events(tmp_path / "tb").Images("bif/groups")
    assert [image.step for image in images] == [10, 40]
    first, last = (Image.open(io.BytesIO(image.encoded_image_string)) for image in images)
    assert first.size == last.size and first.size[0] > 400  # a figure of two panels, not a thumbnail
    with pytest.raises(ValueError, match=r"groups_figure.*log_path"):
        TensorBoardSink(SummaryWriter(str(tmp_path / "other")), make_identity(), charts=["groups_figure"])


def test_chart_names_are_checked() -> None:
    assert check_charts(True) == DEFAULT_CHARTS and check_charts(False) == ()
    assert check_charts("all") == DEFAULT_CHARTS + OPTIONAL_CHARTS
    assert check_charts(["ess", "groups"]) == ("groups", "ess")
    with pytest.raises(ValueError, match=r"Unknown TensorBoard chart.*'heatmap'.*choose from"):
        check_charts(["groups", "heatmap"])


def test_failed_snapshot_writes_its_status_and_the_chosen_duration_and_step_size(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer, make_identity(train_groups=None, probe_groups=None),
                           charts=[*DEFAULT_CHARTS, "duration_s", "step_size"])
    assert sink.group_tags == ["bif_x_nbeta/probes_all"] and [Path(r).name for r in sink.group_runs] == ["train_all"]
    sink.write(record(3, "failed", message="out of memory"))
    failed = record(4, "failed", message="out of memory")
    failed.step_size = 2e-4
    sink.write(failed)
    sink.close()
    writer.close()
    events = read_events(tmp_path / "tb")
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["bif_diag/duration_s", "bif_diag/step_size"]
    assert tags["images"] == [] and tags["histograms"] == []
    assert [(s.step, s.value) for s in events.Scalars("bif_diag/step_size")] == [(4, pytest.approx(2e-4))]
    assert [e.step for e in events.Tensors("bif_diag/status/text_summary")] == [3, 4]
    assert read_events(tmp_path / "tb" / "train_all").Tags()["scalars"] == []


def test_an_unreadable_log_skips_the_groups_figure_with_one_warning(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer, make_identity(), charts=["groups_figure"], log_path=tmp_path / "missing.h5")
    with pytest.warns(UserWarning, match=r"no bif/groups image while the log .*missing.h5 cannot be read") as caught:
        sink.write(record(10))
        sink.write(record(20))
    assert len(caught) == 1
    sink.close()
    writer.close()
    assert read_events(tmp_path / "tb").Tags()["images"] == []
