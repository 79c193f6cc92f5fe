"""cxr-make-sample: layout, naming styles, patient-disjoint splits, class ratio and a learnable difference."""

import collections
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from cxr_tfdata.core import patients
from tests.helpers import REPO_ROOT, assert_quiet
from tfrecords_builder import sample


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "images"
    return root, sample.write_sample(str(root), num_images=160, seed=0)


def test_layout_ratio_and_sizes(written):
    root, images = written
    files = sorted(p for p in root.glob("*/*/*") if p.is_file())
    assert len(files) == len(images) == 160
    by_folder = collections.Counter(p.parent.relative_to(root).as_posix() for p in files)
    assert set(by_folder) == {"train/NORMAL", "train/PNEUMONIA", "test/NORMAL", "test/PNEUMONIA"}
    normal = by_folder["train/NORMAL"] + by_folder["test/NORMAL"]
    assert 0.2 <= normal / 160 <= 0.3
    sizes = {Image.open(p).size for p in files[::10]}
    assert len(sizes) > 5 and all(180 <= min(s) and max(s) <= 600 for s in sizes)
    assert {Image.open(p).mode for p in files[::10]} == {"L"}


def test_names_cover_every_style_and_parse_to_the_planned_patient(written):
    _, images = written
    names = [i.filename for i in images]
    for fragment in ("_bacteria_", "_virus_", "NORMAL2-IM-"):
        assert any(fragment in n for n in names), fragment
    assert any(n.startswith("IM-") for n in names)
    assert all(patients.parse_patient_id(i.filename) == i.patient_id for i in images)
    per_patient = collections.Counter(i.patient_id for i in images)
    assert max(per_patient.values()) >= 2  # patients with several images


def test_train_and_test_are_patient_disjoint_and_seeded(written):
    _, images = written
    train = {i.patient_id for i in images if i.split == "train"}
    test = {i.patient_id for i in images if i.split == "test"}
    assert train and test and not train & test
    assert sample.plan_sample(160, 0) == images
    assert sample.plan_sample(160, 1) != images


def test_classes_are_separable_at_low_resolution(written):
    root, images = written

    def features_of(split):
        xs, ys = [], []
        for item in images:
            if item.split == split:
                path = root / item.split / item.class_name / item.filename
                xs.append(np.asarray(Image.open(path).resize((16, 16)), np.float32).ravel() / 255)
                ys.append(item.class_name == "PNEUMONIA")
        return np.array(xs), np.array(ys)

    model = LogisticRegression(max_iter=2000).fit(*features_of("train"))
    assert model.score(*features_of("test")) >= 0.85


def test_binary_writes_a_sample_and_refuses_a_non_empty_output_dir(tmp_path):
    def make_sample():
        return subprocess.run(
            [sys.executable, "-m", "tfrecords_builder.cli.make_sample", f"--output_dir={tmp_path / 'out'}",
             "--num_images=12", "--seed=4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    first = make_sample()
    assert first.returncode == 0, first.stderr
    assert_quiet(first.stderr, "cxr-make-sample", f"wrote 12 images to {tmp_path / 'out'}")
    assert len(list((tmp_path / "out").glob("*/*/*.jpeg"))) == 12
    second = make_sample()
    assert second.returncode != 0 and "not empty" in second.stderr
