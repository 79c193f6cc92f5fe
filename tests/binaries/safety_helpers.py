"""Helpers of the binary-level safety tests: snapshots of folders, binaries run in a fresh process, small
file systems, and hostile image bytes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.evaluation import evaluate_config
from cxr_tfdata.serving import predict
from tests.helpers import REPO_ROOT
from tfrecords_builder import build

IMAGE_SIZE = 32


def tree_snapshot(path: Path) -> dict[str, str]:
    """relative path -> sha256 (files), 'dir' (folders) or 'link:<target>' (symlinks): a snapshot."""
    snapshot = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                snapshot[rel] = f"link:{os.readlink(full)}"
            elif full.is_dir():
                snapshot[rel] = "dir"
            else:
                snapshot[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return snapshot


def user_home(path: Path) -> Path:
    """A folder of someone's own files."""
    (path / "photos").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff not really a cat")
    return path


def run_binary(module: str, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    full_env.pop("CXR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_error_line(result: subprocess.CompletedProcess, program: str) -> str:
    """The single '<program>: error: ...' line of a failed run (no traceback, nothing after it)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])
    return errors[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small real file system mounted at path (root only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR announces width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_blank_scan(path: Path) -> bytes:
    """A real JPEG whose header is intact but whose entropy-coded scan data is zeroed."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    return data[:scan_start] + bytes(end - scan_start) + data[end:]


def good_png(value: int = 100) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def build_config(input_dir, output_dir, **overrides):
    settings = dict(input_dir=str(input_dir), output_dir=str(output_dir), image_size=IMAGE_SIZE,
                    num_workers=1, num_shards=1)
    settings.update(overrides)
    return build.BuildConfig(**settings)


def evaluation_config(tiny, output_dir, **overrides):

    settings = dict(model_path=str(tiny.model_path), data_dir=str(tiny.data_dir), output_dir=str(output_dir),
                    bootstrap_samples=0, batch_size=16)
    settings.update(overrides)
    return evaluate_config.EvaluateConfig(**settings)


def prediction_config(tiny, paths, **overrides):
    settings = dict(model_path=str(tiny.model_path), paths=tuple(str(p) for p in paths), record_encoding="png")
    settings.update(overrides)
    return predict.PredictConfig(**settings)


def train_config(data_dir, model_dir, epochs: int = 1, **overrides):
    """A frozen-stage cxr-train config on tiny records: random weights, no augmentation, float32."""
    from cxr_tfdata.core.config import (
        AugmentConfig,
        DataConfig,
        ModelConfig,
        StageConfig,
        TrainConfig,
    )

    settings = dict(
        model_dir=str(model_dir), data=DataConfig(data_dir=str(data_dir), image_size=IMAGE_SIZE),
        augment=AugmentConfig(placement="none"), model=ModelConfig(weights="none"),
        frozen=StageConfig(name="frozen", batch_size=4, epochs=epochs), stage="frozen", mixed_precision="float32")
    settings.update(overrides)
    return TrainConfig(**settings)
