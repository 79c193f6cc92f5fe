"""The site key and the keyed hashes of patient ids and paths (cxr_tfdata.core.patient_keys)."""

from __future__ import annotations

import os
import stat

import pytest

from cxr_tfdata.core import folder_scan, patient_keys


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "xdg"))
    return home / "xdg"


def test_the_key_is_created_once_owner_only_and_reused(config_home):
    key = patient_keys.load_key()
    path = config_home / "cxr-tfdata" / "patient_key"
    assert key.path == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    text = path.read_text()
    again = patient_keys.load_key()
    assert path.read_text() == text and again.secret == key.secret
    assert "secret" not in repr(key) and key.secret.hex() not in repr(key)


def test_default_path_without_xdg_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert patient_keys.default_key_path() == str(tmp_path / ".config" / "cxr-tfdata" / "patient_key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "key"
    path.write_text("ab" * 32)
    os.chmod(path, mode)
    with pytest.raises(patient_keys.PatientKeyError, match="group or others"):
        patient_keys.load_key(str(path))


def test_a_given_key_file_is_used_and_must_lie_outside_the_data(tmp_path):
    path = tmp_path / "keys" / "site.key"
    key = patient_keys.load_key(str(path))  # created on first use there too
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert patient_keys.load_key(str(path)).secret == key.secret
    with pytest.raises(patient_keys.PatientKeyError, match="inside --output_dir"):
        patient_keys.load_key(str(path), {"--input_dir": str(tmp_path / "in"), "--output_dir": str(tmp_path / "keys")})


def test_a_file_without_a_key_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(patient_keys.PatientKeyError, match="does not hold a key"):
        patient_keys.load_key(str(path))


def test_hashes_are_stable_keyed_and_hide_the_id():
    key = patient_keys.PatientKey(b"\x01" * 32)
    other = patient_keys.PatientKey(b"\x02" * 32)
    hashed = key.patient("person1")
    assert hashed == key.patient("person1") == patient_keys.PatientKey(b"\x01" * 32).patient("person1")
    assert len(hashed) == patient_keys.PATIENT_HEX_CHARS and int(hashed, 16) >= 0
    assert hashed != key.patient("person2")
    assert hashed != other.patient("person1")
    assert "person1" not in hashed
    assert key.fingerprint != other.fingerprint and key.fingerprint not in key.secret.hex()


def test_redacted_paths_keep_only_known_extensions():
    key = patient_keys.PatientKey(b"\x03" * 32)
    name = key.path_name("Jane-Doe/IM-0001-0001.dcm")
    assert name.endswith(".dcm") and "Jane" not in name
    assert key.path_name("a/b.JPEG").endswith(".JPEG")
    assert key.path_name("Jane.Doe") == key.path_name("Jane.Doe") and "." not in key.path_name("Jane.Doe")
    assert key.path_name("x/y.png") != key.path_name("x/z.png")
    shown = patient_keys.ShownPaths("/data", key)
    assert shown.relative("/data/train/NORMAL/Jane/x.png") == key.path_name("train/NORMAL/Jane/x.png")
    assert patient_keys.ShownPaths("/data").full("/data/a.png") == "/data/a.png"


def test_pseudonymize_hashes_ids_and_keeps_the_class_folder(tmp_path):
    key = patient_keys.PatientKey(b"\x04" * 32)
    image = tmp_path / "IM-0001-0001.jpeg"
    image.write_bytes(b"not a dicom")
    files = [folder_scan.SourceFile(str(image), "train", 0, "NORMAL/Jane/IM-0001-0001.jpeg", "IM-0001", True,
                                    patient_id_from_name=True),
             folder_scan.SourceFile(str(image), "train", 0, "NORMAL/x.jpeg", "table-patient-7", True)]
    plain = patient_keys.pseudonymize(files, key)
    assert [f.patient_id for f in plain] == [key.patient("IM-0001"), key.patient("table-patient-7")]
    assert plain[0].filename == files[0].filename
    redacted = patient_keys.pseudonymize(files, key, redact_paths=True)
    assert redacted[0].filename == "NORMAL/" + key.path_name("Jane/IM-0001-0001.jpeg")
    assert "Jane" not in redacted[0].filename and redacted[0].path == str(image)


def test_a_dicom_is_keyed_by_its_patient_id_then_its_study(tmp_path):
    pytest.importorskip("pydicom")
    import numpy as np

    from tests.dicom_writer import write_dicom

    key = patient_keys.PatientKey(b"\x05" * 32)
    pixels = np.zeros((8, 8), np.uint8)
    with_id = write_dicom(tmp_path / "IM-0001-0001.dcm", pixels, PatientID="MRN-123")
    no_id = write_dicom(tmp_path / "IM-0002-0001.dcm", pixels, PatientID=None, StudyInstanceUID="1.2.3.4")
    assert patient_keys.dicom_identifier(with_id) == "MRN-123"
    assert patient_keys.dicom_identifier(no_id) == "1.2.3.4"
    files = [folder_scan.SourceFile(with_id, "train", 0, "NORMAL/IM-0001-0001.dcm", "IM-0001", True, True),
             folder_scan.SourceFile(no_id, "train", 0, "NORMAL/IM-0002-0001.dcm", "IM-0002", True, True)]
    hashed = patient_keys.pseudonymize(files, key)
    assert [f.patient_id for f in hashed] == [key.patient("MRN-123"), key.patient("1.2.3.4")]
