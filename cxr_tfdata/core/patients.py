"""Patient ids from chest X-ray file names, so that one patient's images stay in one split.

Naming styles in the Kermany et al. / Kaggle data:
  IM-0115-0001.jpeg, IM-0539-0001-0001.jpeg        -> IM-0115, IM-0539
  NORMAL2-IM-0007-0001.jpeg, NORMAL2-IM-1427-0001-0002.jpeg -> NORMAL2-IM-0007, NORMAL2-IM-1427
  person1_bacteria_1.jpeg, person1_virus_6.jpeg, person1_virus_6_1.jpeg -> person1
A name in none of these styles is its own patient: its stem.
"""

from __future__ import annotations

import os
import re

_PATIENT_PATTERNS = (
    # Optional batch prefix (NORMAL2-), patient number, then one or more image numbers.
    re.compile(r"^(?P<patient>(?:[A-Za-z]+\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE),
    re.compile(r"^(?P<patient>person\d+)_(?:bacteria|virus)(?:_\d+)+$", re.IGNORECASE),
)


def parse_patient_id(filename: str) -> str | None:
    """The patient id in a file name (any directory part is ignored), or None when unparseable."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group("patient")
    return None


def patient_id_or_stem(filename: str) -> tuple[str, bool]:
    """(patient id, True) when parsed; (file stem, False) otherwise, making the file its own group."""
    patient = parse_patient_id(filename)
    if patient is not None:
        return patient, True
    return os.path.splitext(os.path.basename(filename))[0], False
