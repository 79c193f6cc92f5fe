"""Keyed hashes of patient identifiers (and, with --redact_paths, of source paths): no patient identity in
any output, for every source.

Every patient key written anywhere (records' `patient_id`, manifest, CSVs, reports, logs) is
HMAC-SHA256(site key, source identifier), hex, truncated to PATIENT_HEX_CHARS (128 bits). The source
identifier is, for a DICOM found by a folder scan, its PatientID, else its StudyInstanceUID, else the
file-name rule (patients.py); for a Kaggle-named JPEG/PNG the file-name rule; for a table its patient
column. Equal identifiers give equal hashes under one key, so splits and leak checks work on hashes.

The key is 32 random bytes (hex text), created on first use OUTSIDE any dataset at
$XDG_CONFIG_HOME/cxr-tfdata/patient_key (default ~/.config/cxr-tfdata/patient_key), file 0600 in a
0700 folder, or given with --patient_key_file. A key file readable or writable by group or others, or
lying inside a folder the run reads or writes, is refused. Outputs name the key only by its
fingerprint (an HMAC of a fixed string, never the key). Two builds on one site share the key, so
they agree; without the key a copied dataset cannot be reversed by hashing a list of record numbers.

`pseudonymize` is the one point where SourceFiles' raw identifiers become hashes: the converter and
every --images_dir reader call it right after scanning, before anything is planned, logged or written.

No TensorFlow here (converter workers and --help import core).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator

KEY_BYTES = 32
PATIENT_HEX_CHARS = 32  # 128 bits of HMAC-SHA256: collisions are out of reach for any dataset
PATH_HEX_CHARS = 32
FINGERPRINT_HEX_CHARS = 16
KEY_FILENAME = "patient_key"
APP_FOLDER = "cxr-tfdata"
# Extensions kept on a redacted path (anything else could itself be a name, e.g. "Jane.Doe").
KEPT_EXTENSIONS = (".dcm", ".dicom", ".dic", ".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Read before the pixels: enough for any real DICOM header (the full file is read when it is not).
_HEADER_READ_BYTES = 1 << 20

_PATIENT_DOMAIN = b"cxr-tfdata patient id\x00"
_PATH_DOMAIN = b"cxr-tfdata path\x00"
_FINGERPRINT_MESSAGE = b"cxr-tfdata patient key fingerprint"


class PatientKeyError(ValueError):
    """The key file is unsafe or unusable; the message names it and says why."""


def default_key_path() -> str:
    """$XDG_CONFIG_HOME/cxr-tfdata/patient_key, or ~/.config/cxr-tfdata/patient_key."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(os.path.abspath(base), APP_FOLDER, KEY_FILENAME)


@dataclasses.dataclass(frozen=True)
class PatientKey:
    """A site's secret key. Its repr never shows the key."""

    secret: bytes = dataclasses.field(repr=False)
    path: str = ""

    def patient(self, identifier: str) -> str:
        """The keyed hash written wherever the patient's id would be."""
        mac = hmac.new(self.secret, _PATIENT_DOMAIN + identifier.encode("utf-8"), hashlib.sha256)
        return mac.hexdigest()[:PATIENT_HEX_CHARS]

    def path_name(self, relative_path: str) -> str:
        """A relative path replaced by its keyed hash, keeping a known image extension."""
        normalized = relative_path.replace(os.sep, "/")
        mac = hmac.new(self.secret, _PATH_DOMAIN + normalized.encode("utf-8"), hashlib.sha256)
        extension = os.path.splitext(normalized)[1]
        return mac.hexdigest()[:PATH_HEX_CHARS] + (extension if extension.lower() in KEPT_EXTENSIONS else "")

    @property
    def fingerprint(self) -> str:
        """Names the key in outputs (manifest, config): an HMAC of a fixed string, not the key."""
        return hmac.new(self.secret, _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_CHARS]


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_outside(path: str, folders: dict[str, str]) -> None:
    for flag, folder in folders.items():
        if folder and _inside(path, folder):
            raise PatientKeyError(f"patient key file {path} lies inside {flag}={folder}: keep the key outside "
                                  f"every dataset and output (a key shipped with the data reverses its hashes)")


def _check_private(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise PatientKeyError(f"patient key file {path} is not a regular file")
    if mode & 0o077:
        raise PatientKeyError(f"patient key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}): "
                              f"run `chmod 600 {path}`")


def _create(path: str) -> None:
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    # Written whole under a private name, then linked into place: a concurrent first run either wins
    # the link or reads the complete key the other wrote, never a half-written file.
    staging = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(staging, path)  # FileExistsError when another run's key is already in place
    finally:
        os.unlink(staging)


def load_key(key_file: str = "", keep_out_of: dict[str, str] | None = None) -> PatientKey:
    """The site key: `key_file` (--patient_key_file) or the default one, created on first use (0600 in a
    0700 folder). keep_out_of: {flag: folder} the key may not lie in (the run's inputs and outputs)."""
    path = os.path.abspath(os.path.expanduser(key_file or default_key_path()))
    _check_outside(path, keep_out_of or {})
    if not os.path.lexists(path):
        try:
            _create(path)
        except FileExistsError:
            pass  # another run created it meanwhile: read that one
        except OSError as e:
            raise PatientKeyError(f"cannot create patient key file {path}: {e.strerror or e}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PatientKeyError(f"cannot read patient key file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        _check_private(path, os.fstat(fd).st_mode)
        text = f.read(4096).strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise PatientKeyError(f"patient key file {path} does not hold a key (at least 32 hex digits)")
    return PatientKey(secret, path)


# --- source identifiers -> hashes ----------------------------------------------------------------


def dicom_identifier(path: str) -> str | None:
    """A DICOM file's PatientID, else its StudyInstanceUID; None for a non-DICOM file or one whose
    header does not parse (the converter then refuses it with its reason). Raw: hash it at once."""
    from cxr_tfdata.core import dicom

    if not dicom.is_dicom(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_READ_BYTES)
            ids = _ids_or_none(dicom, head)
            if ids is None and len(head) == _HEADER_READ_BYTES:
                ids = _ids_or_none(dicom, head + f.read())
    except OSError:
        return None
    if ids is None:
        return None
    return (ids.patient_id or "").strip() or (ids.study_instance_uid or "").strip() or None


def _ids_or_none(dicom, data: bytes):
    try:
        return dicom.read_source_ids(data)
    except dicom.DicomError:
        return None


def _redacted_filename(key: PatientKey, filename: str) -> str:
    """A record's "<CLASS>/<name>" keeps its class folder (the label, not identity)."""
    from cxr_tfdata.core import record_schema

    head, _, rest = filename.partition("/")
    if rest and head in record_schema.CLASS_NAMES:
        return f"{head}/{key.path_name(rest)}"
    return key.path_name(filename)


def pseudonymize(files: list, key: PatientKey, redact_paths: bool = False,
                 imap: Callable[[Callable, list], Iterator] | None = None) -> list:
    """SourceFiles with each patient id replaced by its keyed hash (and, with redact_paths, each
    filename by its keyed hash). A file whose id came from its file name (`patient_id_from_name`) and
    that is a DICOM gets its PatientID (else StudyInstanceUID) as source identifier instead. imap:
    e.g. a worker pool's, to read DICOM headers in parallel (in order)."""
    from_name = [f for f in files if getattr(f, "patient_id_from_name", False)]
    identifiers = dict(zip((f.path for f in from_name),
                           (imap or map)(dicom_identifier, [f.path for f in from_name]), strict=True))
    result = []
    for f in files:
        identifier = identifiers.get(f.path)
        changes = {"patient_id": key.patient(identifier if identifier else f.patient_id)}
        if identifier:
            changes["patient_id_parsed"] = True
        if redact_paths:
            changes["filename"] = _redacted_filename(key, f.filename)
        result.append(dataclasses.replace(f, **changes))
    return result


# --- paths as outputs show them ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShownPaths:
    """How source paths appear in manifests, CSVs, reports and logs: relative to `root` as they are, or
    (key given: --redact_paths) each replaced by its keyed hash."""

    root: str
    key: PatientKey | None = None

    def relative(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return self.key.path_name(rel) if self.key else rel

    def full(self, path: str) -> str:
        """For a log line or an error message: the path itself, or its keyed hash."""
        return self.relative(path) if self.key else path


def relative(path: str, root: str | ShownPaths) -> str:
    """`path` relative to `root` (a folder, or ShownPaths), as outputs show it."""
    return root.relative(path) if isinstance(root, ShownPaths) else os.path.relpath(path, root)


def shown(paths: Iterable[str], root: str, key: PatientKey | None) -> list[str]:
    """Absolute paths as an output shows them: as they are, or (key: --redact_paths) hashed."""
    return [ShownPaths(root, key).full(p) for p in paths]


def full(path: str, root: str | ShownPaths) -> str:
    """`path` as a log line or error shows it: itself, or (ShownPaths with a key) its keyed hash."""
    return root.full(path) if isinstance(root, ShownPaths) else path
