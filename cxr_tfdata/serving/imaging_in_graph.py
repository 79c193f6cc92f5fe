"""The converter's image decode and resize (cxr_tfdata.core.imaging) as TensorFlow ops, for the
serving graph: JPEGs at the converter's reduced DCT scale with libjpeg's accurate DCT, PIL's 8-bit
bilinear arithmetic (two passes, 8-bit in between), the letterbox's geometry, and each image's format
and size read from its header bytes before anything is decoded. On the 321 original radiographs the
pixels equal the converter's for all 321 (benchmarks/serving_parity.py).
"""

from __future__ import annotations

import tensorflow as tf

_JPEG_MAGIC = b"\xff\xd8\xff"


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_HEADER_BYTES = 24  # enough for a PNG's IHDR width and height

# Why the serving graph refuses a CMYK/YCCK JPEG (the converter and cxr-predict score it).
CMYK_REASON = "CMYK JPEG: convert to grayscale or RGB first"


_PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling (Resample.c)


def _pil_bilinear_pass(image: tf.Tensor, out_size) -> tf.Tensor:
    """One pass of PIL's 8-bit bilinear resample along the last axis of a float64 [rows, in] image.

    PIL's arithmetic exactly: the triangle filter widened by the scale when shrinking, taps from
    round(center - support) to round(center + support), weights normalised, turned into 22-bit
    fixed point, summed from half a unit and truncated to 8 bits. So the serving graph resizes as
    the converter does.
    """
    in_size = tf.shape(image)[-1]
    in_float = tf.cast(in_size, tf.float64)
    scale = in_float / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    taps = 2 * tf.cast(tf.math.ceil(filter_scale), tf.int32) + 1
    center = (tf.range(tf.cast(out_size, tf.float64)) + 0.5) * scale
    first = tf.maximum(tf.floor(center - filter_scale + 0.5), 0.0)
    last = tf.minimum(tf.floor(center + filter_scale + 0.5), in_float)
    index = first[:, None] + tf.range(tf.cast(taps, tf.float64))[None, :]
    weights = tf.where(index < last[:, None],
                       tf.nn.relu(1.0 - tf.abs((index - center[:, None] + 0.5) / filter_scale)), 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(total > 0, weights / tf.where(total > 0, total, 1.0), 0.0)
    fixed = tf.floor(0.5 + weights * 2.0 ** _PRECISION_BITS)
    gathered = tf.gather(image, tf.minimum(tf.cast(index, tf.int32), in_size - 1), axis=-1)
    summed = tf.reduce_sum(gathered * fixed, axis=-1) + 2.0 ** (_PRECISION_BITS - 1)
    return tf.clip_by_value(tf.floor(summed / 2.0 ** _PRECISION_BITS), 0.0, 255.0)


def _resize_rounded(image: tf.Tensor, height, width) -> tf.Tensor:
    """PIL's Image.resize(BILINEAR) of an 8-bit gray image in-graph: one pass, stored in 8 bits, then
    the other. [H, W, 1] -> float32 [height, width, 1] integer values.

    The order is Pillow 13's (ImagingResampleInner): the vertical pass first when the height shrinks
    by more than twice as many rows as the width shrinks by columns, else the horizontal pass first.
    The order changes the result by a grey level here and there.
    """
    pixels = tf.cast(image[..., 0], tf.float64)
    shape = tf.shape(pixels)
    rows_lost = shape[0] - tf.cast(height, tf.int32)
    vertical_first = (rows_lost > 0) & (rows_lost > 2 * (shape[1] - tf.cast(width, tf.int32)))

    def across_then_down():
        across = _pil_bilinear_pass(pixels, width)  # [H, width]
        return tf.transpose(_pil_bilinear_pass(tf.transpose(across), height))  # [height, width]

    def down_then_across():
        down = _pil_bilinear_pass(tf.transpose(pixels), height)  # [W, height]
        return _pil_bilinear_pass(tf.transpose(down), width)  # [height, width]

    resized = tf.cond(vertical_first, down_then_across, across_then_down)
    return tf.cast(resized, tf.float32)[..., None]


_DRAFT_SCALES = (1, 2, 4, 8)


def _draft_scale_index(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index in _DRAFT_SCALES of the scale a JPEG is decoded at by the converter (PIL's draft mode,
    libjpeg's DCT scaling): the largest that keeps both sides >= image_size."""
    height_width = tf.image.extract_jpeg_shape(encoded, output_type=tf.int32)
    scale = tf.minimum(height_width[0] // image_size, height_width[1] // image_size)
    return tf.reduce_sum(tf.cast(scale >= tf.constant(_DRAFT_SCALES[1:]), tf.int32))


# By IHDR colour type (byte 25), how a PNG is decoded: gray (0) or RGB (2), where the converter
# ignores a tRNS chunk, so it is not decoded; or RGBA, for gray with alpha (4: gray in R, G and B),
# RGBA (6) and a palette with a tRNS chunk (3: entries with their alpha; without tRNS, as RGB:
# decode_png gives a 1-, 2- or 4-bit palette's missing alpha as 1, 3 or 15, not 255).
_PNG_BRANCH_OF_COLOUR_TYPE = {0: 0, 2: 1, 3: 2, 4: 2, 6: 2}


def _png_has_transparency_chunk(encoded: tf.Tensor) -> tf.Tensor:
    """Whether a tRNS chunk comes before the image data: the chunks are walked from the IHDR, by their lengths."""
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    eight = tf.constant(8, tf.int64)

    def step(offset, found, done):
        head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, offset, eight), b"\0" * 8]), 0, 8)
        raw = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
        kind = tf.strings.substr(head, 4, 4)
        found = tf.equal(kind, b"tRNS")
        done = found | tf.equal(kind, b"IDAT") | tf.equal(kind, b"IEND") | (offset + 8 > size)
        return offset + 12 + raw[0] * 16777216 + raw[1] * 65536 + raw[2] * 256 + raw[3], found, done

    _, found, _ = tf.while_loop(lambda offset, found, done: ~done, step, (eight, tf.constant(False), tf.constant(False)))
    return found


def _png_as_converter(encoded: tf.Tensor) -> tf.Tensor:
    """A PNG as cxr_tfdata.core.imaging.to_grayscale makes it, in PIL's integer arithmetic: uint8 [H, W, 1].

    16-bit gray is rounded by 1/257; other 16-bit samples keep their high byte (PIL's ";16B" raw
    modes); alpha (an alpha channel, or a palette's tRNS) is composited on black as
    Image.alpha_composite does; colour becomes gray by PIL's L24 weights (RGB -> L).
    decode_png(dtype=uint16) gives an 8-bit sample v as v * 257, so the same arithmetic serves both depths.
    """
    colour_type = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 25, 1), tf.uint8)[0], tf.int32)
    # An invalid colour type takes the gray branch, where libpng refuses the header.
    branch = tf.gather([_PNG_BRANCH_OF_COLOUR_TYPE.get(t, 0) for t in range(256)], colour_type)
    branch = tf.where(tf.equal(colour_type, 3) & ~_png_has_transparency_chunk(encoded), 1, branch)

    def samples(channels: int) -> tf.Tensor:
        return tf.cast(tf.io.decode_png(encoded, channels=channels, dtype=tf.uint16), tf.int32)

    def on_black(value: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
        # AlphaComposite.c over an opaque black background (7 precision bits, rounded division by 255).
        scaled = value * alpha * 128 + (0x80 << 7)
        return tf.bitwise.right_shift(tf.bitwise.right_shift(tf.bitwise.right_shift(scaled, 8) + scaled, 8), 7)

    def luma(rgb: tf.Tensor) -> tf.Tensor:  # Convert.c L24: (r 19595 + g 38470 + b 7471 + 0x8000) >> 16
        weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 0x8000
        return tf.bitwise.right_shift(weighted, 16)

    def gray():
        return (2 * samples(1) + 257) // 514  # rint(v / 257); no ties, v * 257 for 8-bit samples

    def rgb():
        return luma(tf.bitwise.right_shift(samples(3), 8))

    def rgba():
        values = tf.bitwise.right_shift(samples(4), 8)
        return luma(on_black(values[..., :3], values[..., 3:]))

    return tf.cast(tf.switch_case(branch, [gray, rgb, rgba]), tf.uint8)


def _decode_source(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 1] as the converter decodes: a JPEG's luma at its draft scale with libjpeg's
    accurate integer DCT (PIL's default), a PNG with PIL's arithmetic (_png_as_converter), other
    formats through decode_image. A CMYK JPEG fails here: decode_jpeg gives no CMYK samples, only
    RGB rounded otherwise than PIL's CMYK -> RGB, so the converter's pixels cannot be repeated; the
    serving graph refuses it from its header first (CMYK_REASON)."""

    def jpeg_at(scale: int):
        return lambda: tf.io.decode_jpeg(encoded, channels=1, ratio=scale, dct_method="INTEGER_ACCURATE")

    def jpeg():
        return tf.switch_case(_draft_scale_index(encoded, image_size), [jpeg_at(s) for s in _DRAFT_SCALES])

    def other():
        return tf.io.decode_image(encoded, channels=1, dtype=tf.uint8, expand_animations=False)

    def png():
        return _png_as_converter(encoded)

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    image = tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, other))
    image.set_shape([None, None, 1])
    return image


def _letterbox(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """cxr_tfdata.core.imaging.resize(pad=True) in-graph: the same size, rounding and offsets.

    float64 and round-half-to-even, as Python's round() of the same product, so the scaled sides
    (and so the black borders) are the converter's to the pixel.
    """
    shape = tf.shape(image, out_type=tf.int64)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scale = image_size / tf.maximum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
    resized = _resize_rounded(image, new_height, new_width)
    return tf.image.pad_to_bounding_box(
        resized, (image_size - new_height) // 2, (image_size - new_width) // 2, image_size, image_size)


_EXIF_PREFIX = b"Exif\0\0"
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\0"
_ORIENTATION_TAG = 0x0112
# Why the serving graph refuses a JPEG whose EXIF orientation it cannot read as PIL does.
UNREADABLE_ORIENTATION_REASON = "unreadable EXIF orientation: rotate the image upright and strip its EXIF first"


def _bytes_at(encoded: tf.Tensor, offset, length: int) -> tf.Tensor:
    """int64 [length] bytes of `encoded` from offset, zeros past its end."""
    offset = tf.clip_by_value(tf.cast(offset, tf.int64), 0, tf.cast(tf.strings.length(encoded), tf.int64))
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, offset, length),
                                              b"\0" * length]), 0, length)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _jpeg_metadata_segments(encoded: tf.Tensor):
    """The JPEG markers before the scan walked as PIL's JpegImagePlugin walks them: (start and length of
    the first APP1 "Exif\\0\\0" payload (-1 if none), start and length of the last APP1 XMP packet
    (-1 if none), whether the walk met something it does not follow)."""
    size = tf.cast(tf.strings.length(encoded), tf.int64)
    minus_one = tf.constant(-1, tf.int64)

    def step(offset, exif_start, exif_length, xmp_start, xmp_length, done, odd):
        raw = _bytes_at(encoded, offset, 4)
        marker = raw[1]
        fill = tf.equal(raw[0], 255) & tf.equal(marker, 255)
        standalone = tf.equal(raw[0], 255) & (((marker >= 0xD0) & (marker <= 0xD8)) | tf.equal(marker, 0x01))
        ends = tf.equal(raw[0], 255) & ((marker == 0xDA) | (marker == 0xD9))
        segment = tf.equal(raw[0], 255) & ~fill & ~standalone & ~ends & (marker != 0)
        length = raw[2] * 256 + raw[3]  # includes its own two bytes
        payload = offset + 4
        truncated = segment & ((length < 2) | (payload + length - 2 > size))
        app1 = segment & ~truncated & tf.equal(marker, 0xE1)
        head = tf.strings.substr(encoded, tf.minimum(payload, size),
                                 tf.minimum(tf.maximum(length - 2, 0), len(_XMP_PREFIX)))
        is_exif = app1 & tf.equal(tf.strings.substr(head, 0, len(_EXIF_PREFIX)), _EXIF_PREFIX) & (exif_start < 0)
        is_xmp = app1 & tf.equal(tf.strings.substr(head, 0, len(_XMP_PREFIX)), _XMP_PREFIX)
        exif_start = tf.where(is_exif, payload + len(_EXIF_PREFIX), exif_start)
        exif_length = tf.where(is_exif, length - 2 - len(_EXIF_PREFIX), exif_length)
        xmp_start = tf.where(is_xmp, payload + len(_XMP_PREFIX), xmp_start)
        xmp_length = tf.where(is_xmp, length - 2 - len(_XMP_PREFIX), xmp_length)
        unknown = ~(fill | standalone | ends | segment)
        odd = odd | truncated | unknown
        done = ends | truncated | unknown | (offset + 2 > size)
        advance = tf.where(fill, tf.constant(1, tf.int64), tf.where(segment, 2 + length, tf.constant(2, tf.int64)))
        return offset + advance, exif_start, exif_length, xmp_start, xmp_length, done, odd

    start = (tf.constant(2, tf.int64), minus_one, minus_one, minus_one, minus_one, tf.constant(False),
             tf.constant(False))
    _, exif_start, exif_length, xmp_start, xmp_length, _, odd = tf.while_loop(
        lambda *state: ~state[5], step, start)
    return exif_start, exif_length, xmp_start, xmp_length, odd


def _tiff_orientation(encoded: tf.Tensor, start: tf.Tensor, length: tf.Tensor):
    """(found, value, ok) of tag 0x0112 in IFD0 of the TIFF block at encoded[start:start + length]
    (start -1: no block): as PIL's Exif.load reads it, the last entry of the tag, a SHORT.
    ok is False where PIL could read it otherwise (not a TIFF header, IFD0 outside the block, the tag
    not one SHORT)."""
    tiff = _bytes_at(encoded, start, 8)
    little = tf.reduce_all(tf.equal(tiff[:4], [0x49, 0x49, 42, 0]))
    big = tf.reduce_all(tf.equal(tiff[:4], [0x4D, 0x4D, 0, 42]))
    # Place values of a 2- and a 4-byte field in the TIFF's byte order.
    weights2 = tf.where(little, tf.constant([1, 256], tf.int64), tf.constant([256, 1], tf.int64))
    weights4 = tf.where(little, tf.constant([1, 256, 65536, 16777216], tf.int64),
                        tf.constant([16777216, 65536, 256, 1], tf.int64))
    ifd = tf.reduce_sum(tiff[4:8] * weights4)
    entries = tf.reduce_sum(_bytes_at(encoded, start + ifd, 2) * weights2)
    tiff_ok = (start >= 0) & (little | big) & (ifd >= 8) & (ifd + 2 + 12 * entries <= length)
    # In the file wherever tiff_ok (the block was checked to lie in it).
    table = tf.strings.substr(encoded, tf.where(tiff_ok, start + ifd + 2, 0), tf.where(tiff_ok, 12 * entries, 0))
    table = tf.reshape(tf.cast(tf.io.decode_raw(table, tf.uint8), tf.int64), [-1, 12])
    tags = tf.reduce_sum(table[:, 0:2] * weights2, axis=1)
    types = tf.reduce_sum(table[:, 2:4] * weights2, axis=1)
    counts = tf.reduce_sum(table[:, 4:8] * weights4, axis=1)
    values = tf.reduce_sum(table[:, 8:10] * weights2, axis=1)
    is_orientation = tf.equal(tags, _ORIENTATION_TAG)
    found = tf.reduce_any(is_orientation)
    position = tf.range(tf.shape(tags, out_type=tf.int64)[0])
    last = is_orientation & tf.equal(position, tf.reduce_max(tf.where(is_orientation, position, -1)))

    def at_last(field):
        return tf.reduce_sum(tf.where(last, field, 0))

    short_ok = ~found | (tf.equal(at_last(types), 3) & tf.equal(at_last(counts), 1))
    return found, tf.where(found, at_last(values), 1), (start < 0) | (tiff_ok & short_ok)


_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _png_metadata(encoded: tf.Tensor):
    """A PNG's chunks walked to IEND, as PIL reads them by the end of load(): (start and length of the
    last eXIf chunk's data (-1 if none), whether a text chunk could carry an orientation this graph
    does not read: a "Raw profile type exif", or an XMP packet compressed or naming tiff:Orientation)."""
    size = tf.cast(tf.strings.length(encoded), tf.int64)

    def step(offset, exif_start, exif_length, unread, done):
        raw = _bytes_at(encoded, offset, 8)
        length = raw[0] * 16777216 + raw[1] * 65536 + raw[2] * 256 + raw[3]
        kind = tf.strings.substr(encoded, tf.minimum(offset + 4, size), 4)
        data_start = tf.minimum(offset + 8, size)
        data = tf.strings.substr(encoded, data_start, tf.maximum(tf.minimum(length, size - data_start), 0))
        head = tf.strings.join([tf.strings.substr(data, 0, 24), b"\0" * 24])  # substr past the end fails
        is_exif = tf.equal(kind, b"eXIf") & (offset + 8 + length <= size)
        exif_start = tf.where(is_exif, offset + 8, exif_start)
        exif_length = tf.where(is_exif, length, exif_length)
        is_text = tf.reduce_any(tf.equal(kind, _PNG_TEXT_CHUNKS))
        raw_profile = is_text & tf.equal(tf.strings.substr(head, 0, 22), b"Raw profile type exif\0")
        xmp = is_text & tf.equal(tf.strings.substr(head, 0, 18), b"XML:com.adobe.xmp\0")
        compressed = tf.equal(kind, b"zTXt") | (tf.equal(kind, b"iTXt") & ~tf.equal(tf.strings.substr(head, 18, 1), b"\0"))
        names = tf.strings.regex_full_match(data, "(?s).*tiff:Orientation.*")
        unread = unread | raw_profile | (xmp & (compressed | names))
        done = tf.equal(kind, b"IEND") | (offset + 12 > size)
        return offset + 12 + length, exif_start, exif_length, unread, done

    minus_one = tf.constant(-1, tf.int64)
    start = (tf.constant(len(_PNG_MAGIC), tf.int64), minus_one, minus_one, tf.constant(False), tf.constant(False))
    _, exif_start, exif_length, unread, _ = tf.while_loop(lambda *state: ~state[4], step, start)
    return exif_start, exif_length, unread


def exif_orientation(encoded: tf.Tensor):
    """(int32 orientation as PIL's Image.getexif() gives it to ImageOps.exif_transpose (1 when none),
    bool readable) of one encoded image, from its metadata: a JPEG's first APP1 "Exif" TIFF IFD0 tag
    0x0112 (a SHORT, byte order "II" or "MM"), else its XMP tiff:Orientation; a PNG's eXIf chunk.
    readable is False where PIL could read an orientation otherwise than this (a malformed or unusual
    EXIF, a PNG's EXIF text profile or compressed XMP): the serving graph refuses such an image.
    Other formats give (1, True)."""
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)

    def jpeg():
        exif_start, exif_length, xmp_start, xmp_length, odd = _jpeg_metadata_segments(encoded)
        found, exif_value, exif_ok = _tiff_orientation(encoded, exif_start, exif_length)
        # PIL reads XMP only when the EXIF has no orientation; the first tiff:Orientation="N" or >N.
        xmp = tf.strings.substr(encoded, tf.maximum(xmp_start, 0), tf.maximum(xmp_length, 0))
        xmp_pattern = "(?s).*?tiff:Orientation(?:=\"|>)([0-9]).*"
        has_xmp = (xmp_start >= 0) & tf.strings.regex_full_match(xmp, xmp_pattern)
        mentions_xmp = (xmp_start >= 0) & tf.strings.regex_full_match(xmp, "(?s).*tiff:Orientation.*")
        xmp_value = tf.strings.to_number(tf.where(has_xmp, tf.strings.regex_replace(xmp, xmp_pattern, "\\1"), "1"),
                                         tf.int64)
        orientation = tf.where(~found & has_xmp, xmp_value, exif_value)
        readable = ~odd & exif_ok & (found | has_xmp | ~mentions_xmp)
        return tf.cast(orientation, tf.int32), readable

    def png():
        exif_start, exif_length, unread = _png_metadata(encoded)
        found, value, exif_ok = _tiff_orientation(encoded, exif_start, exif_length)
        return tf.cast(value, tf.int32), exif_ok & (found | ~unread)

    def other():
        return tf.constant(1, tf.int32), tf.constant(True)

    return tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, other))


def _transposed(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """ImageOps.exif_transpose of an [H, W, 1] image: 2 flip left-right, 3 rotate 180, 4 flip
    top-bottom, 5 transpose, 6 rotate 270 (90 clockwise), 7 transverse, 8 rotate 90; else as it is."""
    transposes = [
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        lambda: tf.transpose(image, [1, 0, 2]),
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [1]),
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [0, 1]),
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [0]),
    ]
    branch = tf.where((orientation >= 2) & (orientation <= 8), orientation - 1, 0)
    oriented = tf.switch_case(branch, transposes)
    oriented.set_shape([None, None, 1])
    return oriented


def decode_image_bytes(encoded: tf.Tensor, image_size: int, pad: bool = False,
                       jpeg_quality: int | None = None, orientation: tf.Tensor | None = None) -> tf.Tensor:
    """One encoded image -> float32 [S, S, 1] integer pixel values in [0, 255] (pad: letterboxed).

    The EXIF orientation is applied after the decode and before the resize, as the converter applies it
    (exif_orientation; the serving graph refuses an image whose orientation it cannot read as PIL does).
    orientation: exif_orientation's value when the caller has read it already (read here otherwise).
    jpeg_quality: encode and decode the resized pixels as JPEG records at that quality are.
    """
    if orientation is None:
        orientation = exif_orientation(encoded)[0]
    image = _transposed(_decode_source(encoded, image_size), orientation)
    pixels = _letterbox(image, image_size) if pad else _resize_rounded(image, image_size, image_size)
    if jpeg_quality is None:
        return pixels
    record = tf.io.encode_jpeg(tf.cast(pixels, tf.uint8), quality=jpeg_quality)
    return tf.cast(tf.io.decode_jpeg(record, channels=1), tf.float32)


def _big_endian_uint32(raw: tf.Tensor, offset: int) -> tf.Tensor:
    """Bytes offset..offset+3 of each row of a [N, K] uint8 tensor as a big-endian int64."""
    b = tf.cast(raw[:, offset:offset + 4], tf.int64)
    return b[:, 0] * 16777216 + b[:, 1] * 65536 + b[:, 2] * 256 + b[:, 3]


def all_as_one_batch(dataset: tf.data.Dataset, count: tf.Tensor, sentinel) -> tuple:
    """Every element of a finite dataset as one batch, plus `sentinel` (index -1) at the end, so
    that there is always exactly one batch, even when every image was dropped."""
    ended = dataset.concatenate(tf.data.Dataset.from_tensors(sentinel))
    return ended.batch(tf.cast(count + 1, tf.int64)).get_single_element()


def header_sizes(image_bytes: tf.Tensor, count: tf.Tensor, index: tf.Tensor):
    """(is_jpeg, is_png, header_ok, [N, 2] height and width, is_cmyk) read from the header bytes only.

    is_cmyk: a JPEG whose frame has 4 components (CMYK or YCCK, as Adobe software writes them).
    """
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, _HEADER_BYTES),
                            tf.fill([count], b"\0" * _HEADER_BYTES)])  # substr clips short inputs
    is_jpeg = tf.equal(tf.strings.substr(head, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    is_png = (tf.equal(tf.strings.substr(head, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
              & tf.equal(tf.strings.substr(head, 12, 4), b"IHDR"))
    raw = tf.reshape(tf.io.decode_raw(tf.strings.substr(head, 0, _HEADER_BYTES), tf.uint8), [count, _HEADER_BYTES])
    png_hw = tf.stack([_big_endian_uint32(raw, 20), _big_endian_uint32(raw, 16)], axis=1)
    # extract_jpeg_shape reads only the header, but raises on a bad one: run it where errors drop.
    jpegs = tf.data.Dataset.from_tensor_slices((tf.boolean_mask(index, is_jpeg), tf.boolean_mask(image_bytes, is_jpeg)))
    # [height, width, components]
    jpegs = jpegs.map(lambda i, b: (i, tf.image.extract_jpeg_shape(b, output_type=tf.int64))).ignore_errors()
    jpeg_index, jpeg_shape = all_as_one_batch(jpegs, count, (tf.constant(-1, tf.int32), tf.zeros([3], tf.int64)))
    kept = jpeg_index >= 0
    jpeg_index, jpeg_shape = tf.boolean_mask(jpeg_index, kept), tf.boolean_mask(jpeg_shape, kept)
    jpeg_ok = tf.scatter_nd(jpeg_index[:, None], tf.ones_like(jpeg_index, tf.bool), [count])
    hw = tf.where(is_jpeg[:, None], tf.scatter_nd(jpeg_index[:, None], jpeg_shape[:, :2], [count, 2]), png_hw)
    is_cmyk = tf.scatter_nd(jpeg_index[:, None], jpeg_shape[:, 2] == 4, [count])
    return is_jpeg, is_png, (is_jpeg & jpeg_ok) | is_png, hw, is_cmyk
