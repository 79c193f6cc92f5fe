"""absl entry points: the only modules that define flags."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from absl import app, flags


def run_main(main: Callable, module_name: str) -> None:
    """app.run(main), with --help listing the flags of `module_name`.

    absl's --help shows only the key flags of the script being run, and a console script's
    __main__ is a wrapper that defines none, so each binary registers its own module's flags.
    """
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


@dataclasses.dataclass(frozen=True)
class RecordFlags:
    """The flags that say how the training records were built (cxr-predict and cxr-export)."""

    data_dir: flags.FlagHolder
    resize: flags.FlagHolder
    record_encoding: flags.FlagHolder
    jpeg_quality: flags.FlagHolder

    def settings(self):
        """predict.RecordSettings from --data_dir's manifest and the flags given explicitly."""
        from cxr_tfdata import predict

        def given(holder: flags.FlagHolder):
            return holder.value if holder.present else None

        return predict.record_settings(self.data_dir.value or "", resize=given(self.resize),
                                       record_encoding=given(self.record_encoding),
                                       jpeg_quality=given(self.jpeg_quality))


def define_record_flags(module_name: str) -> RecordFlags:
    """Defines --data_dir, --resize, --record_encoding and --jpeg_quality for the binary `module_name`.

    The flags are registered as that module's, so its --help (see run_main) lists them.
    """
    from tfrecords_builder import imaging

    return RecordFlags(
        data_dir=flags.DEFINE_string(
            "data_dir", None,
            "The dataset the model was trained on (cxr-build-tfrecords --output_dir): --resize, "
            "--record_encoding and --jpeg_quality are read from its manifest.json, and a conflicting "
            "value given here is refused. Without it those flags (or their defaults) must match the build.",
            module_name=module_name),
        resize=flags.DEFINE_enum(
            "resize", imaging.DEFAULT_RESIZE, imaging.RESIZE_MODES,
            "How images are resized: squash (stretch to a square, the converter's default) or pad (keep "
            "the aspect ratio on black). Use what the records were built with (cxr-build-tfrecords --resize).",
            module_name=module_name),
        record_encoding=flags.DEFINE_enum(
            "record_encoding", imaging.DEFAULT_ENCODING, imaging.ENCODINGS,
            "How the training records stored images (cxr-build-tfrecords --encoding): with jpeg each "
            "resized image goes through the same JPEG round trip, so a source file meets the model as "
            "its record did.",
            module_name=module_name),
        jpeg_quality=flags.DEFINE_integer(
            "jpeg_quality", imaging.DEFAULT_JPEG_QUALITY, "cxr-build-tfrecords --jpeg_quality of the records.",
            module_name=module_name),
    )
