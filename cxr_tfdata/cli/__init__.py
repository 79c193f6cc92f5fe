"""absl entry points: the only modules that define flags."""

from __future__ import annotations

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
