"""No patient identity in any output byte: DICOMs with planted identity strings go through
cxr-build-tfrecords (with --redact_paths, from folders and files named with planted strings), cxr-train,
cxr-evaluate (records and --images_dir), cxr-predict and cxr-export; every byte of every file they write,
and everything they print, is searched for each planted string.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

pytest.importorskip("pydicom", reason='the DICOM reader needs pip install "cxr-tfdata[dicom]"')

from cxr_tfdata.core import patient_keys, record_schema  # noqa: E402
from tests.binaries.safety_helpers import run_binary  # noqa: E402
from tests.dicom_writer import write_dicom  # noqa: E402
from tests.helpers import labelled_image  # noqa: E402

# Every identifying attribute, planted with a string that cannot occur by chance. PatientID gets a
# per-patient suffix (so patients differ), and still starts with its planted string.
PLANTED_TAGS = {
    "PatientName": "ZQXPLANT-NAME-7731",
    "PatientID": "ZQXPLANT-PID-3390",
    "PatientBirthDate": "ZQXPLANT-BIRTH-2209",
    "AccessionNumber": "ZQXPLANT-ACC-4410",
    "InstitutionName": "ZQXPLANT-INST-8802",
    "ReferringPhysicianName": "ZQXPLANT-PHYS-6613",
    "StudyDate": "ZQXPLANT-DATE-5120",
}
PLANTED_FOLDER = "ZQXPLANT-FOLDER-5521"  # a folder named after a patient
PLANTED_FILE = "ZQXPLANT-FILE-9912"  # files named after a patient
PLANTED = (*PLANTED_TAGS.values(), PLANTED_FOLDER, PLANTED_FILE, "ZQXPLANT")
SOURCE_SIZE, IMAGE_SIZE = 40, 32
WINDOW = dict(WindowCenter="127.5", WindowWidth="255", VOILUTFunction="LINEAR_EXACT")


def _write(path, label: int, index: int, patient: int) -> None:
    tags = {**PLANTED_TAGS, "PatientID": f"{PLANTED_TAGS['PatientID']}-{patient}"}
    write_dicom(path, labelled_image(label, index, SOURCE_SIZE)[..., 0], **tags, **WINDOW)


def _folder(root, counts: dict[str, int]) -> None:
    """A Kaggle-layout folder of DICOMs in folders and files named after patients, two images per patient
    (one in test)."""
    index = 0
    for split, per_class in counts.items():
        for label, name in enumerate(record_schema.CLASS_NAMES):
            for _ in range(per_class):
                patient = index if split == "test" else 1000 + index // 2
                path = root / split / name / f"{PLANTED_FOLDER}-{patient}" / f"{PLANTED_FILE}-{index}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                _write(path, label, index, patient)
                index += 1


def _ok(result, program: str) -> str:
    assert result.returncode == 0, f"{program} failed:\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs every binary once; returns (work folder, key file, everything printed, the manifest)."""
    base = tmp_path_factory.mktemp("identity")
    sources, work, keys = base / "sources", base / "work", base / "keys"
    _folder(sources, {"train": 8, "test": 3})
    work.mkdir()
    key_file = keys / "site.key"
    records, model_dir = work / "records", work / "model"
    printed = []
    printed.append(_ok(run_binary(
        "tfrecords_builder.cli.build_tfrecords", f"--input_dir={sources}", f"--output_dir={records}",
        f"--image_size={IMAGE_SIZE}", "--val_fraction=0.25", "--num_workers=1", "--num_shards=1",
        f"--patient_key_file={key_file}", "--redact_paths"), "cxr-build-tfrecords"))
    printed.append(_ok(run_binary(
        "cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={model_dir}", "--weights=none",
        "--train_base", f"--image_size={IMAGE_SIZE}", "--stage=frozen", "--frozen_epochs=1",
        "--frozen_batch_size=4", "--cache=off", timeout=400), "cxr-train"))
    model = model_dir / "final.keras"
    printed.append(_ok(run_binary(
        "cxr_tfdata.cli.evaluate", f"--model={model}", f"--data_dir={records}", "--split=test",
        f"--output_dir={work / 'eval'}", "--bootstrap_samples=20"), "cxr-evaluate"))
    printed.append(_ok(run_binary(
        "cxr_tfdata.cli.evaluate", f"--model={model}", f"--images_dir={sources / 'test'}",
        f"--output_dir={work / 'eval_images'}", "--bootstrap_samples=20", f"--patient_key_file={key_file}",
        "--redact_paths"), "cxr-evaluate --images_dir"))
    printed.append(_ok(run_binary(
        "cxr_tfdata.cli.predict", f"--model={model}", f"--output_csv={work / 'predictions.csv'}",
        f"--patient_key_file={key_file}", "--redact_paths", str(sources / "test")), "cxr-predict"))
    printed.append(_ok(run_binary(
        "cxr_tfdata.cli.export", f"--model={model}", f"--output_dir={work / 'export'}"), "cxr-export"))
    manifest = json.loads((records / "manifest.json").read_text())
    return work, key_file, "\n".join(printed), manifest


def test_no_planted_identity_in_any_output_byte(run):
    work, _, printed, _ = run
    files = [os.path.join(d, f) for d, _, names in os.walk(work) for f in names]
    for expected in ("records/manifest.json", "model/config.json", "eval/predictions.csv", "eval/report.md",
                     "eval/MODEL_CARD.md", "eval_images/predictions.csv", "predictions.csv"):
        assert str(work / expected) in files, expected
    assert any("events.out.tfevents" in f for f in files)  # TensorBoard's logs are searched too
    assert any(f.endswith(".tfrecord-00000-of-00001") for f in files)
    found = []
    for path in files:
        data = open(path, "rb").read()
        found += [(os.path.relpath(path, work), s) for s in PLANTED if s.encode() in data]
        found += [(os.path.relpath(path, work) + " (its name)", s) for s in PLANTED if s in path]
    found += [("printed output", s) for s in PLANTED if s in printed]
    assert not found, found


def test_patient_ids_are_keyed_hashes_and_the_key_stays_private(run):
    work, key_file, _, manifest = run
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = patient_keys.load_key(str(key_file))
    assert manifest["patient_ids"]["key_fingerprint"] == key.fingerprint
    assert key.secret.hex() not in (work / "records" / "manifest.json").read_text()
    rows = (work / "eval_images" / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    ids = {row.split(",")[header.index("patient_id")] for row in rows[1:]}
    expected = {key.patient(f"{PLANTED_TAGS['PatientID']}-{p}") for p in range(16, 22)}
    assert ids == expected  # one per test image's patient, hashed from its DICOM PatientID
    names = [row.split(",")[header.index("filename")] for row in rows[1:]]
    assert all(n.split("/")[0] in record_schema.CLASS_NAMES and n.endswith(".dcm") for n in names)
    predicted = (work / "predictions.csv").read_text().splitlines()[1:]
    assert len(predicted) == 6 and all(len(row.split(",")[0]) == 32 + len(".dcm") for row in predicted)
