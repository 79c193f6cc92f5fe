"""Patient ids parsed from every naming style of the chest X-ray file names."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxr_tfdata.core import patients


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0539-0001-0001.jpeg", "IM-0539"),
        ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
        ("NORMAL2-IM-1427-0001-0002.jpeg", "NORMAL2-IM-1427"),
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1_virus_6.jpeg", "person1"),
        ("person1372_bacteria_3501.jpeg", "person1372"),
        ("person1_virus_6_1.jpeg", "person1"),
        ("train/PNEUMONIA/person22_virus_55.jpeg", "person22"),
        ("IM-0001-0001.png", "IM-0001"),
    ],
)
def test_parses_every_naming_style(filename, expected):
    assert patients.parse_patient_id(filename) == expected
    assert patients.patient_id_or_stem(filename) == (expected, True)


@pytest.mark.parametrize("filename", ["scan.jpeg", "IM-0115.jpeg", "person_virus_1.jpeg", "person1_fungus_2.jpeg", "x-ray 1.png"])
def test_unparseable_name_is_its_own_group(filename):
    assert patients.parse_patient_id(filename) is None
    stem = filename.rsplit(".", 1)[0]
    assert patients.patient_id_or_stem(filename) == (stem, False)


@given(patient=st.integers(0, 99999), image=st.integers(0, 99999), kind=st.sampled_from(["bacteria", "virus"]))
def test_person_style_property(patient, image, kind):
    assert patients.parse_patient_id(f"person{patient}_{kind}_{image}.jpeg") == f"person{patient}"


@given(patient=st.integers(0, 9999), images=st.lists(st.integers(1, 9999), min_size=1, max_size=3),
       prefix=st.sampled_from(["", "NORMAL2-"]))
def test_im_style_property(patient, images, prefix):
    name = f"{prefix}IM-{patient:04d}-" + "-".join(f"{i:04d}" for i in images) + ".jpeg"
    assert patients.parse_patient_id(name) == f"{prefix}IM-{patient:04d}"
