"""Figures of a log: files for each figure and format, the panels/labels/colour bar they promise, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_identity, make_result, record

from lightning_bif import open_log
from lightning_bif.log import LogWriter
from lightning_bif.log.summaries import group_means
from lightning_bif.viewers.cli import main as cli_main
from lightning_bif.viewers.plot import (
    FIGURES,
    log_spaced,
    plot_groups,
    plot_matrix,
    plot_pairs,
    plot_sign_changes,
    plot_top_examples,
    write_figures,
)

STEPS = (0, 2, 4, 8, 16, 32, 64)  # log-spaced, with a snapshot at fit start
# make_identity: train ids 0, 7, ..., 49 in groups i % 3; probe ids 0, 1, 2 in groups [0, 1, 1].


def flipping_record(step: int, status: str = "ok"):
    """A random snapshot whose (probe 0, train 0) entry turns from clearly helpful to clearly harmful at step 8."""
    result = make_result(step)
    result.stderr = torch.full_like(result.stderr, 0.01)
    result.influence *= 1e-3  # the other entries stay within 3 standard errors of 0
    result.influence[0, 0] = -0.5 if step < 8 else 0.5
    return record(step, status, result=result)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plot") / "bif.h5"
    statuses = {4: "diverged", 16: "failed"}
    with LogWriter(path, make_identity()) as writer:
        for step in STEPS:
            status = statuses.get(step, "ok")
            writer.append(flipping_record(step, status) if status != "failed" else record(step, "failed",
                                                                                         message="boom"))
    return path


def titles(figure) -> list[str]:
    return [axis.get_title() for axis in figure.axes]


def legend_texts(legend) -> list[str]:
    return [text.get_text() for text in legend.get_texts()]


def test_groups_figure_has_a_panel_per_probe_group_a_line_per_train_group_and_the_loss_above(log_path: Path) -> None:
    with open_log(log_path) as log:
        figure = plot_groups(log)
        panels = [axis for axis in figure.axes if axis.get_title().startswith("probe group")]
        assert [axis.get_title() for axis in panels] == ["probe group 0", "probe group 1"]
        (legend,) = [legend for sub in figure.subfigs for legend in sub.legends]
        assert legend.get_title().get_text() == "train group" and legend_texts(legend) == ["0", "1", "2"]
        assert any(axis.get_ylabel() == "training loss" for axis in figure.axes)
        strip = next(axis for axis in figure.axes if axis.get_ylabel().startswith("split"))
        assert [text.get_text() for text in strip.texts] == ["diverged", "failed"]  # non-ok snapshots named
        assert all(axis.get_xscale() == "symlog" for axis in panels)
        # Probe group 1, train group 2: the group means of the snapshots with an estimate, and a ±2 SE band.
        (line,) = [line for line in panels[1].get_lines() if line.get_label() == "2"]
        rows = np.flatnonzero(log.status != "failed")
        np.testing.assert_array_equal(line.get_xdata(), log.steps[rows])
        expected = [group_means(log.influence[r], log.probe_groups, log.train_groups).means[1, 2] for r in rows]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)
        assert len(panels[1].collections) == 3  # one band per train group
        assert "bands ±2 SE" in figure.subfigs[0]._suptitle.get_text()


def test_pairs_are_chosen_by_dataset_id_and_drawn_with_error_bars(log_path: Path) -> None:
    with open_log(log_path) as log:
        figure = plot_pairs(log, [(0, 0), (2, 49)])
        axis = next(axis for axis in figure.axes if axis.get_legend() is not None and "←" in
                    legend_texts(axis.get_legend())[0])
        assert legend_texts(axis.get_legend()) == ["probe 0 (0) ← train 0 (0)", "probe 2 (1) ← train 49 (1)"]
        # Train id 49 is at position 7: the curve is that entry, not the one at position 49 (there is none).
        curve = log.trajectory(probe=2, train=7)
        rows = np.flatnonzero(log.status != "failed")
        drawn = axis.containers[1]
        np.testing.assert_allclose(drawn.lines[0].get_ydata(), curve.influence[rows])
        assert "< 0 helps" in axis.get_ylabel()
        # Without pairs: the clearest sign change comes first.
        default = plot_pairs(log)
        assert "probe 0 (0) ← train 0 (0)" in legend_texts(default.axes[-1].get_legend())
        with pytest.raises(ValueError, match=r"Unknown train id 5: .* ids 0, 7, 14"):
            plot_pairs(log, [(0, 5)])


def test_matrix_small_multiples_are_labelled_with_a_symmetric_colour_bar(log_path: Path) -> None:
    with open_log(log_path) as log:
        figure = plot_matrix(log, steps=[0, 5, 64])
        panels = [axis for axis in figure.axes if axis.get_images()]
        assert [axis.get_title() for axis in panels] == ["step 0", "step 4  (diverged)", "step 64"]
        colorbar = panels[-1].get_images()[0].colorbar
        assert colorbar.ax.get_ylabel() == "BIF   blue < 0: helps  ·  red > 0: harms"
        low, high = panels[0].get_images()[0].get_clim()
        assert high > 0 and low == -high
        assert [t.get_text() for t in panels[0].get_xticklabels()] == ["0", "1", "2"]
        assert panels[0].get_xlabel() == "training examples (8) by group"
        assert panels[0].get_ylabel() == "probes (3) by group"
        # Columns sorted by group: group 0 holds positions 0, 3, 6.
        np.testing.assert_allclose(panels[0].get_images()[0].get_array()[0, :3], log.influence[0][0, [0, 3, 6]])
        assert len(plot_matrix(log).axes) == 5  # by default four usable snapshots and the colour bar
        with pytest.raises(ValueError, match=r"Step 100 is outside the log's snapshots \(steps 0..64\)"):
            plot_matrix(log, steps=[100])
        with pytest.raises(ValueError, match=r"snapshot at step 16 .* failed: boom"):
            plot_matrix(log, steps=[17])


def test_sign_changes_timeline_counts_and_lists_the_flipping_pair(log_path: Path) -> None:
    with open_log(log_path) as log:
        changes = log.sign_changes()
        assert [(c.probe, c.train) for c in changes] == [(0, 0)]
        figure = plot_sign_changes(log)
        counts, listing = figure.axes
        assert figure._suptitle.get_text().startswith("1 sign change(s) among 24 (probe, train) pairs over 5 ok")
        assert legend_texts(counts.get_legend()) == ["turn harmful (1)", "turn helpful (0)"]
        assert [t.get_text() for t in listing.get_yticklabels()] == ["probe 0 (0) ← train 0 (0)"]
        assert listing.get_lines()[1].get_xdata()[0] == pytest.approx(changes[0].crossing)


def test_top_examples_are_the_most_negative_and_most_positive_on_average(log_path: Path) -> None:
    with open_log(log_path) as log:
        figure = plot_top_examples(log, probe=1, k=2)
        helpful, harmful = (axis for axis in figure.axes if axis.get_title().startswith("most"))
        assert helpful.get_title() == "most helpful (most negative)"
        ok = np.flatnonzero(log.status == "ok")
        mean = np.mean([log.influence[row][1] for row in ok], axis=0)
        order = np.argsort(mean)
        assert legend_texts(helpful.get_legend()) == [f"train {log.train_ids[i]} ({log.train_groups[i]})"
                                                      for i in order[:2]]
        assert legend_texts(harmful.get_legend()) == [f"train {log.train_ids[i]} ({log.train_groups[i]})"
                                                      for i in order[::-1][:2]]
        assert "probe 1 (1)" in figure.subfigs[0]._suptitle.get_text()
        with pytest.raises(ValueError, match="Unknown probe id 9"):
            plot_top_examples(log, probe=9)
        with pytest.raises(ValueError, match="k must be at least 1"):
            plot_top_examples(log, k=0)


def test_correlation_keeps_blue_for_helping_although_its_sign_is_the_opposite(log_path: Path) -> None:
    figure = plot_matrix(log_path, steps=[64], quantity="correlation")
    (panel,) = [axis for axis in figure.axes if axis.get_images()]
    assert panel.get_images()[0].get_cmap().name == "RdBu"
    assert panel.get_images()[0].colorbar.ax.get_ylabel() == "correlation   blue > 0: helps  ·  red < 0: harms"


def test_bad_requests_are_refused_with_what_to_do(log_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'token_influence' is per-token.*token_trajectory"):
        plot_groups(log_path, quantity="token_influence")
    with pytest.raises(ValueError, match="Unknown quantity 'stderr'"):
        plot_pairs(log_path, [(0, 0)], quantity="stderr")
    with pytest.raises(ValueError, match="Unknown figure format 'jpg'"):
        write_figures(log_path, tmp_path, format="jpg")
    failed_only = tmp_path / "failed.h5"
    with LogWriter(failed_only, make_identity()) as writer:
        writer.append(record(3, "failed", message="out of memory"))
        writer.append(record(5, "diverged"))
    for plot in (plot_groups, plot_pairs, plot_matrix, plot_sign_changes, plot_top_examples):
        with pytest.raises(ValueError, match=r"no ok snapshot to plot \(snapshots: 1 diverged, 1 failed\)"):
            plot(failed_only)
    assert not list(tmp_path.glob("*.png"))


def test_write_figures_in_each_format_and_from_the_cli(log_path: Path, tmp_path: Path, capsys) -> None:
    written = write_figures(log_path, tmp_path / "png", prefix="run_")
    assert [path.name for path in written] == [f"run_{name}.png" for name in FIGURES]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)
    (pdf,) = write_figures(log_path, tmp_path / "pdf", format="pdf", figures=["matrix"])
    assert pdf.read_bytes().startswith(b"%PDF")

    assert cli_main(["plot", str(log_path), "--out", str(tmp_path / "svg"), "--format", "svg", "--pair", "1:7",
                     "2:49", "--steps", "0", "64", "--probe", "2", "--top-k", "1", "--figures", "pairs", "matrix"]) == 0
    assert sorted(p.name for p in (tmp_path / "svg").iterdir()) == ["matrix.svg", "pairs.svg"]
    assert b"<svg" in (tmp_path / "svg" / "pairs.svg").read_bytes()[:500]
    assert "wrote" in capsys.readouterr().out
    for arguments, message in ((["--pair", "1:5"], "Unknown train id 5"), (["--pair", "1-7"], "PROBE_ID:TRAIN_ID"),
                               (["--steps", "99"], "outside the log's snapshots"),
                               (["--probe", "x"], "probe id 'x' is not an integer")):
        assert cli_main(["plot", str(log_path), "--out", str(tmp_path / "bad"), *arguments]) == 1
        assert message in capsys.readouterr().err
    assert cli_main(["plot", str(log_path), "--out", str(tmp_path / "bad"), "--quantity", "token_influence"]) == 1
    assert "'token_influence' is per-token" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_many_groups_get_line_styles_and_linear_schedules_a_linear_axis(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    identity = make_identity(train_ids=np.arange(12), train_groups=np.arange(12), probe_groups=None)
    with LogWriter(path, identity) as writer:
        for step in (10, 20, 30, 40):
            writer.append(record(step, result=make_result(step, train=12)))
    figure = plot_groups(path)
    (legend,) = [legend for sub in figure.subfigs for legend in sub.legends]
    styles = [handle.get_linestyle() for handle in legend.legend_handles]
    assert styles[:10] == ["-"] * 10 and styles[10:] == ["--", "--"]
    colors = [handle.get_color() for handle in legend.legend_handles]
    assert len(set(map(tuple, colors[:10]))) == 10
    assert [axis.get_title() for axis in figure.axes if axis.get_title()] == ["probe group all"]
    assert all(axis.get_xscale() == "linear" for axis in figure.axes)
    assert log_spaced(np.array(STEPS)) and not log_spaced(np.arange(0, 500, 50))


def test_group_names_stored_in_the_log_label_panels_legends_and_axes(log_path: Path) -> None:
    with open_log(log_path) as log:
        # Logs of format 2 carry {label: name}; older logs have none and show the labels (tests above).
        log.train_group_names, log.probe_group_names = {0: "zeros", 1: "ones"}, {1: "held out"}
        groups = plot_groups(log)
        assert [axis.get_title() for axis in groups.axes if axis.get_title()] == [
            "probe group 0", "probe group held out"]
        (legend,) = [legend for sub in groups.subfigs for legend in sub.legends]
        assert legend_texts(legend) == ["zeros", "ones", "2"]
        (panel, *_) = [axis for axis in plot_matrix(log, steps=[64]).axes if axis.get_images()]
        assert [t.get_text() for t in panel.get_yticklabels()] == ["0", "held out"]
        pairs = plot_pairs(log, [(2, 49)])
        assert legend_texts(pairs.axes[-1].get_legend()) == ["probe 2 (held out) ← train 49 (ones)"]
