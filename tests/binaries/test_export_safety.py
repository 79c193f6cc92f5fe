"""cxr-export as a hostile or careless user would run it: a training run is never overwritten, and a serving
batch with bad images answers every good one."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.files import output_safety
from cxr_tfdata.modeling import loading
from tests.binaries.safety_helpers import (
    good_png,
    png_header_claiming,
    tree_snapshot,
)


def test_export_overwrite_refuses_a_training_run(tiny, tmp_path):
    from cxr_tfdata.serving import export

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny.model_path, run / "final.keras")
    (run / "checkpoints" / "frozen_state.json").write_text("{}")
    (run / "history_frozen.csv").write_text("epoch,loss\n0,0.5\n")
    before = tree_snapshot(run)
    config = export.ExportConfig(model_path=str(run / "final.keras"), output_dir=str(run), overwrite=True,
                                 record_encoding="png")
    with pytest.raises(output_safety.UnsafeOutputError, match="contains --model"):
        export.export(config)
    elsewhere = tmp_path / "model.keras"
    shutil.copy(tiny.model_path, elsewhere)
    with pytest.raises(output_safety.UnsafeOutputError, match="is not a SavedModel written by cxr-export"):
        export.export(export.ExportConfig(model_path=str(elsewhere), output_dir=str(run), overwrite=True,
                                          record_encoding="png"))
    assert tree_snapshot(run) == before
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "run"]


def test_a_serving_batch_with_bad_images_answers_every_good_one(tiny, tmp_path):
    import tensorflow as tf

    from cxr_tfdata.serving import export

    model = loading.load_model(str(tiny.model_path))
    module = export.ServingModule(model)
    good_a, good_b = good_png(1), good_png(2)
    flat = io.BytesIO()
    Image.new("L", (40, 40), 128).save(flat, format="JPEG")
    batch = [good_a, b"", b"GIF89a not supported", png_header_claiming(50_000, 50_000),
             good_a[: len(good_a) // 2], flat.getvalue(), b"\xff\xd8\xff\xe0 broken", good_b]
    result = module.serve(tf.constant(batch))
    errors = [e.decode() for e in result["error"].numpy()]
    probability = result["probability"].numpy()
    assert errors[0] == errors[7] == ""
    assert errors[1] == "empty input" and errors[2] == "not a JPEG or PNG image"
    assert errors[3].startswith("image too large: 50000x50000 pixels")
    assert errors[4] == "cannot decode the image: corrupt or truncated data"
    assert errors[5].startswith("near-constant image") and errors[6] == "corrupt JPEG header"
    assert np.isnan(probability[1:7]).all()
    alone = module.serve(tf.constant([good_a, good_b]))["probability"].numpy()
    np.testing.assert_allclose(probability[[0, 7]], alone, atol=1e-6)
