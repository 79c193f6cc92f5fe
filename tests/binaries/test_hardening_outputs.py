"""cxr-predict and cxr-evaluate hardening: an existing CSV is replaced only with --overwrite, every
CSV and Markdown table survives any file name, and an unreadable subfolder gets its own row."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys

import pytest

from cxr_tfdata.files import output_safety, table_cells
from cxr_tfdata.serving import predict
from tests.binaries.safety_helpers import good_png, prediction_config, run_binary
from tests.helpers import REPO_ROOT

# Names no CSV row or Markdown table may be split by: CR, LF, CRLF, tab, quotes, commas, formula starters.
HOSTILE_NAMES = ["x\r=1+1.png", "a\nb.png", "c\r\nd.png", "t\tab.png", 'q"uo"te.png', "co,mma.png",
                 "=HYPERLINK(1).png", "+cmd.png", "-2.png", "@SUM.png", "\tlead.png", "|pipe|.png", "plain.png"]


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def _unguarded(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "in"
    folder.mkdir()
    for i, name in enumerate(HOSTILE_NAMES):
        (folder / name).write_bytes(good_png(i))
    (folder / "bad\r=2.png").write_bytes(b"not an image")
    return folder


def test_table_cells_csv_round_trips_every_name():
    text = table_cells.csv_text(["path", "p"], [[name, 0.5] for name in HOSTILE_NAMES] + [["x", None]])
    rows = _rows(text)
    assert len(rows) == len(HOSTILE_NAMES) + 2 and rows[0] == ["path", "p"]
    assert [_unguarded(row[0]) for row in rows[1:-1]] == HOSTILE_NAMES
    assert all(row[1] == "0.5" for row in rows[1:-1]) and ',0.5\n' in text  # numbers stay bare
    assert text.count("\n") - sum(name.count("\n") for name in HOSTILE_NAMES) == len(rows)
    for name in HOSTILE_NAMES:
        cell = table_cells.markdown_cell(name)
        assert "\n" not in cell and "\r" not in cell and "|" not in cell.replace("\\|", "")


def test_predict_csv_survives_any_file_name(tiny, hostile_folder, tmp_path):
    out = tmp_path / "out.csv"
    rows = predict.predict(prediction_config(tiny, [hostile_folder], output_csv=str(out)), io.StringIO())
    written = _rows(open(out, newline="").read())
    assert len(written) == len(rows) + 1 == len(HOSTILE_NAMES) + 2
    assert sorted(_unguarded(r[0]) for r in written[1:]) == sorted(row.path for row in rows)
    assert not [cell for r in written for cell in r if cell.startswith(table_cells.FORMULA_STARTERS)]


def test_evaluate_predictions_csv_and_report_rows_survive_any_file_name():
    import numpy as np

    from cxr_tfdata.evaluation import inference, report, results

    n = len(HOSTILE_NAMES)
    split = inference.SplitPredictions(filenames=list(HOSTILE_NAMES), patient_ids=list(reversed(HOSTILE_NAMES)),
                                       labels=np.arange(n) % 2, probabilities=np.linspace(0.1, 0.9, n, dtype=np.float32))
    written = _rows(results.predictions_csv(split))
    assert len(written) == n + 1
    assert [_unguarded(r[0]) for r in written[1:]] == HOSTILE_NAMES
    assert [_unguarded(r[1]) for r in written[1:]] == list(reversed(HOSTILE_NAMES))
    assert not [cell for r in written for cell in r if cell.startswith(table_cells.FORMULA_STARTERS)]
    rows = [f"| {table_cells.markdown_cell(name)} | {table_cells.markdown_cell('bad: ' + name)} |"
            for name in HOSTILE_NAMES]
    assert all("\n" not in row and "\r" not in row for row in rows)
    assert all(row.replace("\\|", "").count("|") == 3 for row in rows)  # two cells, no column break
    assert "\n" not in report.code("site\r\n`x|=1")


def test_predict_never_replaces_an_existing_csv_without_overwrite(tiny, hostile_folder, tmp_path):
    mine = tmp_path / "mine.csv"
    reviewed = (",".join(predict.CSV_COLUMNS) + ",notes\nscan1.png,0.9,0.9,PNEUMONIA,,reviewed by Dr A\n").encode()
    mine.write_bytes(reviewed)
    config = prediction_config(tiny, [hostile_folder / "plain.png"], output_csv=str(mine))
    with pytest.raises(output_safety.UnsafeOutputError, match="--output_csv=.*exists.*--overwrite"):
        predict.predict(config, io.StringIO())
    assert mine.read_bytes() == reviewed
    image = hostile_folder / "plain.png"
    before = image.read_bytes()
    with pytest.raises(output_safety.UnsafeOutputError, match="same path as image path 1"):
        predict.predict(prediction_config(tiny, [image], output_csv=str(image), overwrite=True), io.StringIO())
    assert image.read_bytes() == before
    predict.predict(prediction_config(tiny, [image], output_csv=str(mine), overwrite=True), io.StringIO())
    assert _rows(mine.read_text())[0] == list(predict.CSV_COLUMNS)


def test_predict_binary_overwrite_flag_and_unreadable_subfolder_row(tiny, tmp_path):
    """A real cxr-predict, without the capability to read past permissions (as a non-root user runs it)."""
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "good.png").write_bytes(good_png())
    (folder / "locked" / "hidden.png").write_bytes(good_png(3))
    out = tmp_path / "out.csv"
    out.write_text("the user's\n")
    folder.joinpath("locked").chmod(0)
    try:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search"] if shutil.which("setpriv") else []
        base = [sys.executable, "-m", "cxr_tfdata.cli.predict", f"--model={tiny.model_path}",
                f"--output_csv={out}", "--record_encoding=png", str(folder)]
        refused = subprocess.run(drop + base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
        assert refused.returncode == 1 and "--overwrite" in refused.stderr.splitlines()[-1], refused.stderr[-2000:]
        assert out.read_text() == "the user's\n"
        result = subprocess.run(drop + base + ["--overwrite"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=240)
    finally:
        folder.joinpath("locked").chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r[0]: r for r in _rows(out.read_text())[1:]}
    assert set(rows) == {str(folder / "good.png"), str(folder / "locked")}
    if drop:
        assert "folder that cannot be listed: Permission denied" in rows[str(folder / "locked")][4]
    assert f"cxr-predict: {folder / 'locked'}: " in result.stderr


def test_predict_binary_help_lists_overwrite():
    result = run_binary("cxr_tfdata.cli.predict", "--helpfull", timeout=120)
    assert "overwrite: Replace an existing --output_csv" in result.stdout + result.stderr
