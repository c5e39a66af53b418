"""Cheap looks at encoded image bytes: a structural check and the image size from the header.

``encoded_problem`` and ``image_size`` run per sample in the sample source's workers, so they read a
few header bytes instead of opening the image: ``image_size`` walks JPEG markers to the frame header (about 100x cheaper than
``PIL.Image.open``, which the source would otherwise pay per sample) and reads PNG's IHDR; other
formats, and EXIF orientation, go through PIL. ``decode_problem`` is the full, strict decode of
tools/check_dataset.py and of the trainer's pre-flight sample.
"""
from __future__ import annotations

import io

# A JPEG may carry a few bytes after its end-of-image marker; the marker is searched this far back.
_EOI_SEARCH_BYTES = 4096
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# Markers without a length field.
_STANDALONE = frozenset((0x01, 0xD8, *range(0xD0, 0xD8)))
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def encoded_problem(data: bytes) -> str | None:
    """A cheap structural check that catches truncated/empty files before the decoder fails the
    whole batch; None when the bytes look decodable. Full decodes are tools/check_dataset.py's job."""
    if len(data) == 0:
        return "empty file"
    if data[:3] == b"\xff\xd8\xff":
        if data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_SEARCH_BYTES)) < 0:
            return "truncated JPEG (no end-of-image marker)"
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if data[:2] == b"BM" or data[:4] in (b"II*\0", b"MM\0*") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return f"not an image (starts with {data[:8]!r})"


def jpeg_problem(data: bytes) -> str | None:
    """Decodes a JPEG with libjpeg-turbo in strict mode: recoverable errors (damaged entropy-coded
    data, extraneous bytes, a scan that ends early) fail instead of yielding a patched-up image,
    which is what Pillow and DALI's decoders return (with at most a printed warning)."""
    try:
        import simplejpeg
    except ImportError:
        raise ModuleNotFoundError("strict JPEG decoding needs simplejpeg (`pip install simplejpeg`, a project "
                                  "dependency); or set data.preflight_decodes 0") from None

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "RGB", strict=True)
    except ValueError as error:
        return f"corrupt JPEG data ({error})"
    return None


def decode_problem(data: bytes) -> str | None:
    """A full, strict decode: None when the image decodes cleanly, else what is wrong."""
    problem = encoded_problem(data)
    if problem is not None:
        return problem
    if data[:3] == b"\xff\xd8\xff":
        return jpeg_problem(data)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as error:  # PIL raises format-specific errors for broken files
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in _SOF_MARKERS:
            if position + 9 > end:
                return None
            height = data[position + 5] << 8 | data[position + 6]
            width = data[position + 7] << 8 | data[position + 8]
            return (height, width) if height and width else None  # height 0: defined later (DNL)
        position += 2 + (data[position + 2] << 8 | data[position + 3])
    return None


def image_size(data: bytes, *, exif: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an encoded image as the decoder will output it (EXIF orientation
    applied when ``exif``). Raises ``ValueError`` when the header holds no size."""
    if not exif:
        if data[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(data)
            if size is not None:
                return size
        elif data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if exif else 1
    except Exception as error:  # PIL raises format-specific errors for unreadable headers
        raise ValueError(f"no image size in the header ({type(error).__name__}: {error})") from None
    return (width, height) if orientation in _TRANSPOSED else (height, width)
