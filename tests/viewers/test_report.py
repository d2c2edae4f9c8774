"""``lightning-bif report``: one self-contained HTML page with every section, nothing loaded from elsewhere."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_identity, record
from PIL import Image
from test_tokens import write_log as write_token_log

from lightning_bif.log import LogWriter
from lightning_bif.viewers.cli import main
from lightning_bif.viewers.report import SECTIONS, SUMMARY_COLUMNS


def write_log(path: Path) -> Path:
    with LogWriter(path, make_identity()) as writer:
        for r in (record(10), record(20, "failed", message="boom <b>"), record(30, "diverged"), record(45)):
            writer.append(r)
    return path


def report(tmp_path: Path, log: Path, capsys) -> str:
    out = tmp_path / "report.html"
    assert main(["report", str(log), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    return out.read_text(encoding="utf-8")


def self_contained(page: str) -> list[np.ndarray]:
    """Check that nothing is loaded from elsewhere (the embedded token view included); the decoded images."""
    every = page + html.unescape(page)
    references = re.findall(r"""\b(?:src|href|action|srcset)\s*=\s*["']([^"']*)""", every)
    assert all(ref.startswith(("data:", "#")) for ref in references), references
    assert not re.search(r"url\(|@import|https?://|<link\b", every)
    images = []
    for encoded in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")))
    return images


def test_the_report_has_every_section_marks_non_ok_snapshots_and_loads_nothing(tmp_path: Path, capsys) -> None:
    page = report(tmp_path, write_log(tmp_path / "bif.h5"), capsys)
    for section in SECTIONS[:-1]:
        assert f'<section id="{section}">' in page, section
    assert '<section id="tokens">' not in page  # not a per-token log
    for name in ("groups", "pairs", "matrix", "sign_changes", "top_examples"):
        assert f'<figure id="figure-{name}">' in page
    for column in SUMMARY_COLUMNS:
        assert f"<dt>{column}</dt>" in page
    rows = re.findall(r'<tr class="([^"]*)"><td>(\d+)</td>', page)
    assert [(css, int(step)) for css, step in rows] == [("", 10), ("not-ok failed", 20), ("not-ok diverged", 30),
                                                         ("", 45)]
    assert "step 20: <b>failed</b> — boom &lt;b&gt;" in page  # the message, escaped
    images = self_contained(page)
    assert len(images) == 6  # five figures and the diagnostics
    assert all(image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0 for image in images)


def test_a_per_token_log_gets_the_token_view_embedded(tmp_path: Path, capsys) -> None:
    page = report(tmp_path, write_token_log(tmp_path / "tokens.h5"), capsys)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    view = html.unescape(re.search(r'<iframe title="token view" srcdoc="([^"]*)"', page).group(1))
    assert view.startswith("<!DOCTYPE html>") and "heapq" in view
    self_contained(page)


@pytest.mark.parametrize("where", ["missing/report.html", "."])
def test_an_output_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path: Path, capsys,
                                                                               where: str) -> None:
    log = write_log(tmp_path / "bif.h5")
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", str(log), "--out", str(tmp_path / where)]) == 1
    error = capsys.readouterr().err
    assert "lightning-bif: error: --out" in error and ("does not exist" in error or "is a directory" in error)
    assert sorted(tmp_path.rglob("*")) == before
