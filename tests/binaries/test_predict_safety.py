"""cxr-predict as a hostile or careless user would run it: FIFOs, devices, bombs and links get their rows;
outputs never overwrite an input or a foreign file."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest

from cxr_tfdata.files import output_safety, table_cells
from cxr_tfdata.serving import predict
from tests.binaries.safety_helpers import (
    good_png,
    png_header_claiming,
    prediction_config,
    run_binary,
    tree_snapshot,
    user_home,
)


def test_a_fifo_does_not_hang_predict_and_gets_its_row(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(good_png())
    os.mkfifo(folder / "waiting.png")
    result = run_binary("cxr_tfdata.cli.predict", f"--model={tiny.model_path}", "--record_encoding=png",
                  f"--output_csv={tmp_path / 'out.csv'}", str(folder), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "out.csv").open())}
    assert "a FIFO (named pipe), not a regular file" in rows[str(folder / "waiting.png")]["error"]
    assert rows[str(folder / "good.png")]["error"] == ""


def test_devices_huge_files_bombs_and_linked_folders_get_their_rows(tiny, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(good_png())
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "huge.png").write_bytes(good_png() + bytes(2 << 20))
    (folder / "bomb.png").write_bytes(png_header_claiming(50_000, 50_000))
    (folder / "linked").symlink_to(folder / "sub", target_is_directory=True)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    rows = {Path(r.path).name: r for r in predict.predict(prediction_config(tiny, [folder], max_file_mb=1),
                                                          io.StringIO())}
    assert rows["good.png"].error == "" and rows["good.png"].probability is not None
    assert "a character device, not a regular file" in rows["zero.png"].error
    assert "larger than the 1 MB limit" in rows["huge.png"].error
    assert "image too large" in rows["bomb.png"].error
    assert rows["linked"].error == "cannot read image: symbolic link to a folder (not followed)"
    assert rows["dangling.png"].error == "cannot read image: broken symbolic link"


def test_predict_csv_has_no_formula_cells(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=HYPERLINK(\"evil.example\",\"x\").png", "+cmd.png", "-2+3.png", "@SUM(A1).png", "\tx.png"]
    for name in names:
        (folder / name).write_bytes(good_png())
    (folder / "=bad.png").write_bytes(b"not an image")  # its error message repeats nothing dangerous first
    out = tmp_path / "out.csv"
    predict.predict(prediction_config(tiny, [folder], output_csv=str(out)), io.StringIO())
    cells = [cell for row in csv.reader(out.open()) for cell in row]
    assert len(cells) == len(predict.CSV_COLUMNS) * (len(names) + 2)
    assert not [cell for cell in cells if cell.startswith(table_cells.FORMULA_STARTERS)]
    assert f"'{folder}" not in cells  # paths not starting with a formula character are left as they are


@pytest.mark.parametrize("target", ["model", "image", "foreign_file", "inside_input_folder"])
def test_predict_outputs_never_overwrite_an_input_or_a_foreign_file(tiny, tmp_path, target):
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "good.png"
    image.write_bytes(good_png())
    model = tmp_path / "model.keras"
    shutil.copy(tiny.model_path, model)
    (tmp_path / "notes.txt").write_text("mine")
    csv_path = {"model": model, "image": image, "foreign_file": tmp_path / "notes.txt",
                "inside_input_folder": folder / "out.csv"}[target]
    before = tree_snapshot(tmp_path)
    with pytest.raises(output_safety.UnsafeOutputError, match="--output_csv"):
        predict.predict(prediction_config(tiny, [folder], model_path=str(model), output_csv=str(csv_path)),
                        io.StringIO())
    with pytest.raises(output_safety.UnsafeOutputError, match="--gradcam_dir"):
        predict.predict(prediction_config(tiny, [folder], model_path=str(model), gradcam_dir=str(folder)),
                        io.StringIO())
    assert tree_snapshot(tmp_path) == before


def test_predict_replaces_its_own_csv_and_gradcams(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(good_png())
    out, cams = tmp_path / "out.csv", tmp_path / "cams"
    for overwrite in (False, True):  # the second run (--overwrite) replaces the first run's CSV and overlays
        predict.predict(prediction_config(tiny, [folder], output_csv=str(out), gradcam_dir=str(cams),
                                          overwrite=overwrite), io.StringIO())
    assert sorted(os.listdir(cams)) == [output_safety.FOLDER_MARKER, "good_gradcam.png"]
    (cams / "mine.txt").write_text("the user's")
    (cams / "good_gradcam.png").unlink()
    user_home(tmp_path / "home")
    with pytest.raises(output_safety.UnsafeOutputError, match="not empty and was not written by cxr-predict"):
        predict.predict(prediction_config(tiny, [folder], gradcam_dir=str(tmp_path / "home")), io.StringIO())
