"""Tests of cxr_tfdata.serving.gradcam's panels: drawn on the source at its resolution, heatmap mapped back
through the squash or letterbox resize, a text band with the numbers, fallbacks that do not crash."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.core import imaging
from cxr_tfdata.modeling import image_scoring
from cxr_tfdata.serving import gradcam
from tests import eval_fixtures, helpers

SIZE = eval_fixtures.IMAGE_SIZE


@pytest.fixture(scope="module")
def model():
    return eval_fixtures.tiny_model()


def _source(folder, name: str, height: int, width: int, index: int = 0) -> str:
    """A PNG of height x width grayscale pixels with structure (a labelled image cut to size)."""
    pixels = helpers.labelled_image(1, index, max(height, width))[:height, :width]
    path = folder / name
    path.write_bytes(helpers.encode_png(pixels))
    return str(path)


def _row(path: str, pad: bool, probability: float = 0.8, calibrated: float | None = None,
         threshold: float = 0.5) -> image_scoring.PredictionRow:
    pixels = image_scoring.load_image(path, SIZE, pad, "png")
    return image_scoring.PredictionRow(path=path, probability=probability, calibrated_probability=calibrated,
                                 label="PNEUMONIA" if probability >= threshold else "NORMAL", pixels=pixels)


def _split(panel: Image.Image, shown_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(band, left, right) of a panel whose halves are shown_hw: the band on top, the halves below
    it, left flush with the panel's left edge and right with its right edge."""
    array = np.asarray(panel.convert("RGB"))
    height, width = shown_hw
    band_height, gap = array.shape[0] - height, array.shape[1] - 2 * width
    assert band_height > 0 and 0 <= gap < max(8, width // 10), (array.shape, shown_hw)
    return array[:band_height], array[band_height:, :width], array[band_height:, width + gap:]


def _source_gray(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def _heatmap(model, row) -> np.ndarray:
    return gradcam.gradcam_heatmaps(model, row.pixels[None])[0]


def _is_amber(band: np.ndarray) -> bool:
    red, green, blue = (band[..., i].astype(int) for i in range(3))
    return bool(np.any((red - blue > 120) & (green - blue > 60)))


@pytest.mark.parametrize("pad", [False, True])
def test_large_source_is_drawn_at_its_own_resolution(model, tmp_path, pad):
    path = _source(tmp_path, "wide.png", 500, 700)
    row = _row(path, pad)
    written = gradcam.write_gradcams(model, [row], str(tmp_path / "cams"), batch_size=4, pad=pad)
    with Image.open(written[0]) as panel:
        assert panel.mode == "RGB" and panel.width >= 1400 and panel.height > 500
        band, left, right = _split(panel, (500, 700))
    source = _source_gray(path)
    for channel in range(3):
        np.testing.assert_array_equal(left[..., channel], source)
    assert np.any(right != left)
    mapped = gradcam.heatmap_on_source(_heatmap(model, row), (500, 700), SIZE, pad)
    np.testing.assert_allclose(right.astype(int), gradcam.overlay(source, mapped).astype(int), atol=1)
    assert np.any(band != band[0, 0])


def test_small_source_is_upscaled_keeping_its_aspect(model, tmp_path):
    path = _source(tmp_path, "small.png", 30, 40)
    shown_hw = gradcam.display_size(30, 40)
    assert max(shown_hw) >= gradcam.MIN_LONG_SIDE
    assert abs(shown_hw[0] - shown_hw[1] * 30 / 40) <= 1
    written = gradcam.write_gradcams(model, [_row(path, False)], str(tmp_path / "cams"), batch_size=1)
    with Image.open(written[0]) as panel:
        _, left, right = _split(panel, shown_hw)
    upscaled = Image.fromarray(_source_gray(path)).resize(shown_hw[::-1], gradcam.DISPLAY_RESAMPLING)
    for channel in range(3):
        np.testing.assert_array_equal(left[..., channel], np.asarray(upscaled))
    assert np.any(right != left)


@pytest.mark.parametrize("hw", [(30, 40), (500, 700), (700, 500), (512, 512), (2048, 1000), (3000, 4000),
                                (10, 1000), (5000, 20)])
def test_display_size_bounds_the_long_side_and_keeps_the_aspect(hw):
    height, width = hw
    shown_height, shown_width = gradcam.display_size(height, width)
    long_side = max(height, width)
    if gradcam.MIN_LONG_SIDE <= long_side <= gradcam.MAX_LONG_SIDE:
        assert (shown_height, shown_width) == hw  # never rescaled in range, above all never shrunk
    else:
        assert gradcam.MIN_LONG_SIDE <= max(shown_height, shown_width) <= gradcam.MAX_LONG_SIDE
        scale = max(shown_height, shown_width) / long_side
        assert abs(shown_height - height * scale) <= 1 and abs(shown_width - width * scale) <= 1


def _blob(height: int, width: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """A smooth bump in [0, 1] at `centre` (fractions of height, width) on a zero background."""
    ys, xs = np.mgrid[0:height, 0:width]
    distance2 = ((ys - centre[0] * height) ** 2 + (xs - centre[1] * width) ** 2) / (radius * max(height, width)) ** 2
    return np.exp(-distance2).astype(np.float32)


@pytest.mark.parametrize("source_hw", [(500, 700), (700, 500), (301, 97)])
@pytest.mark.parametrize("pad", [False, True])
def test_heatmap_on_source_undoes_the_resize(source_hw, pad):
    truth = _blob(*source_hw, centre=(0.3, 0.7), radius=0.2)
    as_scored = imaging.resize(Image.fromarray(np.round(truth * 255).astype(np.uint8)), SIZE, pad)
    heatmap = np.asarray(as_scored, np.float32) / 255.0
    mapped = gradcam.heatmap_on_source(heatmap, source_hw, SIZE, pad)
    assert mapped.shape == source_hw and mapped.dtype == np.float32
    error = float(np.mean(np.abs(mapped - truth)))
    assert error < 0.02
    # Mapped back through the other resize, the blob lands elsewhere (unless the source is square).
    wrong = gradcam.heatmap_on_source(heatmap, source_hw, SIZE, not pad)
    assert float(np.mean(np.abs(wrong - truth))) > 2 * error
    shown = gradcam.heatmap_on_source(heatmap, source_hw, SIZE, pad, output_hw=(2 * source_hw[0], 2 * source_hw[1]))
    assert shown.shape == (2 * source_hw[0], 2 * source_hw[1])


def test_heatmap_concentrated_in_the_letterbox_content_stays_on_the_source():
    source_hw = (500, 700)
    left, top, right, bottom = gradcam.letterbox_box(source_hw, SIZE)
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[top:bottom, left:right] = 1.0
    mapped = gradcam.heatmap_on_source(heatmap, source_hw, SIZE, pad=True)
    assert mapped.shape == source_hw
    np.testing.assert_allclose(mapped, 1.0)  # none of the zero bars was stretched onto the source
    squashed = gradcam.heatmap_on_source(heatmap, source_hw, SIZE, pad=False)
    assert squashed.min() == 0.0


@pytest.mark.parametrize("source_hw", [(500, 700), (700, 500), (30, 40), (1, 9), (9, 1), (33, 33), (97, 301),
                                       (1000, 333)])
@pytest.mark.parametrize("image_size", [SIZE, 224, 7])
def test_letterbox_box_is_where_the_converter_puts_the_image(source_hw, image_size):
    white = Image.new("L", source_hw[::-1], 255)
    letterboxed = np.asarray(imaging.resize(white, image_size, pad=True))
    rows, columns = np.nonzero(letterboxed)
    expected = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
    assert gradcam.letterbox_box(source_hw, image_size) == expected


def test_caption_states_probability_label_and_threshold():
    row = image_scoring.PredictionRow(path="a.png", probability=0.873, calibrated_probability=0.812, label="PNEUMONIA")
    numbers, legend = gradcam.caption_lines(row, 0.374, "model's operating threshold")
    assert numbers == "P(PNEUMONIA) 0.873 (calibrated 0.812) | label PNEUMONIA | threshold 0.374 (model's operating threshold)"
    assert "red" in legend and "PNEUMONIA" in legend
    uncalibrated = image_scoring.PredictionRow(path="a.png", probability=0.2, calibrated_probability=0.2, label="NORMAL")
    numbers, _ = gradcam.caption_lines(uncalibrated, 0.5)
    assert numbers == "P(PNEUMONIA) 0.200 | label NORMAL | threshold 0.500"
    # A probability that would read as equal to the threshold gets the decimals that tell them apart.
    close = image_scoring.PredictionRow(path="a.png", probability=0.37404, label="PNEUMONIA")
    numbers, _ = gradcam.caption_lines(close, 0.374)
    assert "0.37404" in numbers and "threshold 0.37400" in numbers


def test_text_band_shows_the_numbers(model, tmp_path):
    path = _source(tmp_path, "chest.png", 500, 700)
    row = _row(path, False, probability=0.873)
    heatmap = _heatmap(model, row)
    bands = {}
    for key, probability, calibrated in (("plain", 0.873, None), ("calibrated", 0.873, 0.812),
                                         ("other", 0.131, None)):
        row.probability, row.calibrated_probability = probability, calibrated
        panel = gradcam.gradcam_panel(row, heatmap, threshold=0.374, threshold_source="model's operating threshold")
        bands[key], _, _ = _split(panel, (500, 700))
    background = bands["plain"][0, 0]
    assert np.any(np.any(bands["plain"] != background, axis=-1))
    assert not _is_amber(bands["plain"])
    assert bands["plain"].shape == bands["other"].shape and np.any(bands["plain"] != bands["other"])
    # The calibrated probability is drawn: the first line differs, whether or not the longer text wraps.
    assert bands["calibrated"].shape[1] == bands["plain"].shape[1]
    assert bands["calibrated"].shape[0] >= bands["plain"].shape[0]
    shared = bands["plain"].shape[0]
    assert np.any(bands["calibrated"][:shared] != bands["plain"][:shared])


def test_long_text_wraps_inside_a_narrow_panel():
    gray = np.full((512, 100), 128, np.uint8)
    lines = ["P(PNEUMONIA) 0.873 (calibrated 0.812) | label PNEUMONIA | threshold 0.374 (a long source name)"]
    panel = np.asarray(gradcam.render_panel(gray, np.zeros_like(gray, np.float32), lines))
    band = panel[:panel.shape[0] - 512]
    background = band[0, 0]
    margin = max(14, round(panel.shape[1] / 64)) // 2
    assert band.shape[0] > 3 * margin  # more than one line
    assert np.all(band[:, -margin // 2:] == background)  # nothing drawn past the right margin


def test_unreadable_rows_are_skipped_and_names_stay_apart(model, tmp_path):
    first = _source(tmp_path, "img0.png", 60, 50)
    (tmp_path / "other").mkdir()
    second = _source(tmp_path / "other", "img0.png", 60, 50, index=1)
    rows = [_row(first, False), image_scoring.PredictionRow(path=str(tmp_path / "bad.png"), error="corrupt"),
            _row(second, False)]
    written = gradcam.write_gradcams(model, rows, str(tmp_path / "cams"), batch_size=2)
    assert [p.rsplit("/", 1)[1] for p in written] == ["img0_gradcam.png", "img0_gradcam_1.png"]
    assert sorted(p.name for p in (tmp_path / "cams").iterdir() if not p.name.startswith(".")) == [
        "img0_gradcam.png", "img0_gradcam_1.png"]


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_source_gone_or_changed_after_scoring_falls_back(model, tmp_path, change):
    path = _source(tmp_path, "chest.png", 500, 700)
    row = _row(path, True)
    if change == "removed":
        (tmp_path / "chest.png").unlink()
    else:
        inverted = 255 - helpers.labelled_image(1, 0, 700)[:500]
        (tmp_path / "chest.png").write_bytes(helpers.encode_png(inverted))
    written = gradcam.write_gradcams(model, [row], str(tmp_path / "cams"), batch_size=1, pad=True)
    shown_hw = gradcam.display_size(SIZE, SIZE)
    with Image.open(written[0]) as panel:
        band, left, right = _split(panel, shown_hw)
    upscaled = Image.fromarray(row.pixels[..., 0]).resize(shown_hw[::-1], gradcam.DISPLAY_RESAMPLING)
    np.testing.assert_array_equal(left[..., 0], np.asarray(upscaled))
    assert np.any(right != left)
    assert _is_amber(band)  # the note that the source was not used
