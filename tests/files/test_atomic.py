"""Tests of cxr_tfdata.files.atomic: whole files or none, written with the mode the umask gives."""

from __future__ import annotations

import pytest

from cxr_tfdata.files import atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    import os
    import stat

    from matplotlib.figure import Figure

    from cxr_tfdata.evaluation import plots

    previous = os.umask(umask)
    try:
        atomic.write_text(str(tmp_path / "metrics.json"), "{}")
        figure = Figure()
        figure.add_subplot().plot([0, 1], [0, 1])
        plots._save(figure, str(tmp_path / "roc.png"))
    finally:
        os.umask(previous)
    for name in ("metrics.json", "roc.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
