"""The flags that say how a model's training records were built (cxr-predict and cxr-export)."""

from __future__ import annotations

import dataclasses

from absl import flags

from cxr_tfdata.core import imaging


@dataclasses.dataclass(frozen=True)
class RecordFlags:
    """The flags that say how the training records were built (cxr-predict and cxr-export). A model
    written by cxr-train carries these values in its contract, so they are only ever checked."""

    data_dir: flags.FlagHolder
    resize: flags.FlagHolder
    record_encoding: flags.FlagHolder
    jpeg_quality: flags.FlagHolder

    def given(self) -> dict:
        """{resize, record_encoding, jpeg_quality}: the value typed on the command line, else None."""
        return {name: holder.value if holder.present else None
                for name, holder in (("resize", self.resize), ("record_encoding", self.record_encoding),
                                     ("jpeg_quality", self.jpeg_quality))}


def define_record_flags(module_name: str) -> RecordFlags:
    """Defines --data_dir, --resize, --record_encoding and --jpeg_quality for the binary `module_name`.

    The flags are registered as that module's, so its --help (see run_main) lists them.
    """
    return RecordFlags(
        data_dir=flags.DEFINE_string(
            "data_dir", None,
            "Optional: the dataset the model was trained on (cxr-build-tfrecords --output_dir), checked "
            "against the model: its image size and its build's --resize, --encoding and --jpeg_quality must "
            "match what the model's contract says.",
            module_name=module_name),
        resize=flags.DEFINE_enum(
            "resize", None, imaging.RESIZE_MODES,
            "Not needed for a model written by cxr-train (its contract says how its images are resized); "
            "a value contradicting the contract is refused. For a model without a contract: squash "
            f"(stretch to a square) or pad (keep the aspect ratio on black); default {imaging.DEFAULT_RESIZE}.",
            module_name=module_name),
        record_encoding=flags.DEFINE_enum(
            "record_encoding", None, imaging.ENCODINGS,
            "Not needed for a model written by cxr-train; a contradicting value is refused. For a model "
            "without a contract: how its training records stored images (cxr-build-tfrecords --encoding); "
            "with jpeg each resized image goes through the same JPEG round trip, so a source file meets "
            f"the model as its record did. Default {imaging.DEFAULT_ENCODING}.",
            module_name=module_name),
        jpeg_quality=flags.DEFINE_integer(
            "jpeg_quality", None,
            "Not needed for a model written by cxr-train; a contradicting value is refused. For a model "
            f"without a contract: cxr-build-tfrecords --jpeg_quality of its records (default "
            f"{imaging.DEFAULT_JPEG_QUALITY}).",
            module_name=module_name),
    )
