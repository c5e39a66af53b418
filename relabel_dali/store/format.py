"""Label shard format v2: the whole on-disk layout, declared here and nowhere else.

No I/O lives in this module. A dataset of label maps is a folder holding

* ``labels-NNNNN.rls`` shard files: a fixed 64-byte header followed by fixed-size records;
* ``labels-NNNNN.keys`` beside each shard: its sample keys, one per line (UTF-8), in record order.
  A shard counts as complete only once its ``.keys`` file exists (it is written after the shard);
* ``index.json``, written last: the shard list in dataset order plus the map geometry, and per
  shard the CRC-32 of its ``.keys`` file (``keys_crc32``): the keys decide which image gets which
  record, so a reordered or edited keys file must be caught like a damaged record.

Version history: v1 had no ``keys_crc32``. The records did not change, but a v1 folder cannot prove
its keys intact, so v2 readers refuse it and ask for a repack.

Everything is little-endian and declared as explicit numpy dtypes, so a record read from disk is
a zero-copy view with no parsing. Records are fixed-size so record ``i`` of a shard lives at
``HEADER_SIZE + i * record_size``: O(1) random access with one multiplication.

Scores are stored in canonical layout ``[k, y, x]`` (rows top to bottom, columns left to right of
the whole image) together with 16-bit class ids of the same shape. ``uint8`` scores use an affine
per-record quantization ``score = offset + scale * q``; float dtypes store scale 1 and offset 0.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MAGIC = b"RLDLBLS1"
VERSION = 2
HEADER_SIZE = 64
# Records are padded to this many bytes so float32 scores stay aligned in every record.
RECORD_ALIGN = 16

SHARD_SUFFIX = ".rls"
KEYS_SUFFIX = ".keys"
INDEX_NAME = "index.json"
INDEX_FORMAT = "relabel_dali.labels"

# dtype codes written into the header; codes are never reused for another dtype.
SCORE_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("u1")}
SCORE_DTYPE_NAMES = {"float32": 1, "float16": 2, "uint8": 3}
CLASS_ID_DTYPES = {1: np.dtype("<u2")}
CLASS_ID_CODE = 1
MAX_CLASSES = int(np.iinfo(np.uint16).max) + 1

# The 64-byte header. header_crc32 covers every header byte before it.
HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_size", "<u4"),
        ("k", "<u2"),
        ("height", "<u2"),
        ("width", "<u2"),
        ("score_dtype", "u1"),
        ("class_id_dtype", "u1"),
        ("num_classes", "<u4"),
        ("record_size", "<u4"),
        ("record_count", "<u8"),
        ("reserved", "V20"),
        ("header_crc32", "<u4"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE


class FormatError(ValueError):
    """A shard, record or index that does not follow this format version."""


def version_problem(version, source: str) -> str | None:
    """None for this version; otherwise what is wrong and what to do."""
    if version == VERSION:
        return None
    if isinstance(version, int) and 0 < version < VERSION:
        return (f"{source}: format version {version}, this reader reads {VERSION}: written by an older "
                f"relabel_dali whose index does not checksum the key files; pack it again into a fresh "
                f"folder (tools/pack_labels.py or tools/relabel.py)")
    return f"{source}: format version {version}, this reader reads {VERSION}"


def score_dtype_code(name: str) -> int:
    try:
        return SCORE_DTYPE_NAMES[name]
    except KeyError:
        raise FormatError(
            f"unknown score dtype {name!r}: expected one of {sorted(SCORE_DTYPE_NAMES)}"
        ) from None


def score_dtype_name(code: int) -> str:
    for name, value in SCORE_DTYPE_NAMES.items():
        if value == code:
            return name
    raise FormatError(f"unknown score dtype code {code}: expected one of {sorted(SCORE_DTYPES)}")


@lru_cache(maxsize=None)
def record_dtype(k: int, height: int, width: int, score_code: int) -> np.dtype:
    """The fixed-size record. crc32 covers every record byte after the crc32 field itself.
    Cached: building a structured dtype costs ~13 us, and the sample source asks per sample."""
    shape = (k, height, width)
    fields = [
        ("crc32", "<u4"),
        ("scale", "<f4"),
        ("offset", "<f4"),
        ("reserved", "<u4"),
        ("scores", SCORE_DTYPES[score_code], shape),
        ("class_ids", CLASS_ID_DTYPES[CLASS_ID_CODE], shape),
    ]
    packed = np.dtype(fields)
    padded = -(-packed.itemsize // RECORD_ALIGN) * RECORD_ALIGN
    return np.dtype({
        "names": list(packed.names),
        "formats": [packed.fields[name][0] for name in packed.names],
        "offsets": [packed.fields[name][1] for name in packed.names],
        "itemsize": padded,
    })


def checksum(buffer) -> int:
    return zlib.crc32(memoryview(buffer).cast("B")) & 0xFFFFFFFF


def record_checksum(record_bytes: memoryview) -> int:
    return checksum(record_bytes[4:])


@dataclass(frozen=True)
class Geometry:
    """What every record of a dataset shares."""

    k: int
    height: int
    width: int
    num_classes: int
    score_code: int

    @property
    def score_dtype(self) -> str:
        return score_dtype_name(self.score_code)

    @property
    def record_dtype(self) -> np.dtype:
        return record_dtype(self.k, self.height, self.width, self.score_code)

    def validate(self) -> None:
        for name in ("k", "height", "width"):
            value = getattr(self, name)
            if not 1 <= value <= 0xFFFF:
                raise FormatError(f"{name} must be in [1, 65535], got {value}")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise FormatError(f"num_classes must be in [1, {MAX_CLASSES}], got {self.num_classes}")
        if self.score_code not in SCORE_DTYPES:
            raise FormatError(f"unknown score dtype code {self.score_code}")


def make_header(geometry: Geometry, record_count: int) -> np.ndarray:
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["magic"] = MAGIC
    header["version"] = VERSION
    header["header_size"] = HEADER_SIZE
    header["k"], header["height"], header["width"] = geometry.k, geometry.height, geometry.width
    header["score_dtype"] = geometry.score_code
    header["class_id_dtype"] = CLASS_ID_CODE
    header["num_classes"] = geometry.num_classes
    header["record_size"] = geometry.record_dtype.itemsize
    header["record_count"] = record_count
    header["header_crc32"] = checksum(header.tobytes()[: HEADER_SIZE - 4])
    return header


def parse_header(raw: bytes, source: str) -> tuple[Geometry, int]:
    """Validates a header and returns (geometry, record_count). ``source`` names the file in errors."""
    if len(raw) < HEADER_SIZE:
        raise FormatError(f"{source}: file is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
    header = np.frombuffer(raw[:HEADER_SIZE], dtype=HEADER_DTYPE)[0]
    if bytes(header["magic"]) != MAGIC:
        raise FormatError(f"{source}: magic {bytes(header['magic'])!r}, expected {MAGIC!r}: not a label shard")
    expected_crc = checksum(raw[: HEADER_SIZE - 4])
    if int(header["header_crc32"]) != expected_crc:
        raise FormatError(
            f"{source}: header checksum {int(header['header_crc32']):#010x}, computed {expected_crc:#010x}"
        )
    problem = version_problem(int(header["version"]), source)
    if problem:
        raise FormatError(problem)
    if int(header["class_id_dtype"]) != CLASS_ID_CODE:
        raise FormatError(f"{source}: class id dtype code {int(header['class_id_dtype'])}, expected {CLASS_ID_CODE}")
    if int(header["score_dtype"]) not in SCORE_DTYPES:
        raise FormatError(f"{source}: score dtype code {int(header['score_dtype'])}, expected one of "
                          f"{sorted(SCORE_DTYPES)}")
    geometry = Geometry(int(header["k"]), int(header["height"]), int(header["width"]),
                        int(header["num_classes"]), int(header["score_dtype"]))
    geometry.validate()
    if int(header["record_size"]) != geometry.record_dtype.itemsize:
        raise FormatError(f"{source}: record_size {int(header['record_size'])}, expected "
                          f"{geometry.record_dtype.itemsize} for this geometry")
    return geometry, int(header["record_count"])


def score_fit_problem(scores: np.ndarray, score_code: int) -> str | None:
    """None when every (finite) score survives storage as ``score_code``; otherwise which score does
    not. float16 turns anything beyond +-65504 into inf, and inf scores give NaN targets."""
    with np.errstate(over="ignore"):
        return _score_fit_problem(scores, score_code)


def _score_fit_problem(scores: np.ndarray, score_code: int) -> str | None:
    if score_code == 2:
        limit = float(np.finfo(np.float16).max)
        magnitude = np.abs(scores)
        worst = np.unravel_index(int(np.argmax(magnitude)), scores.shape)
        if np.isinf(np.float16(scores[worst])):
            return (f"score {float(scores[worst]):.6g} at [k, y, x] = {[int(i) for i in worst]} does not fit "
                    f"float16 (largest finite value {limit:.0f}); store float32 or uint8 scores")
    elif score_code == 3 and scores.size:
        span = np.float32(scores.max()) - np.float32(scores.min())
        if not np.isfinite(span):
            return (f"scores span [{float(scores.min()):.6g}, {float(scores.max()):.6g}], too wide for uint8 "
                    f"quantization; store float32 scores")
    return None


def encode_scores(scores: np.ndarray, score_code: int) -> tuple[np.ndarray, float, float]:
    """float32 scores -> (stored array, scale, offset). uint8 maps [min, max] onto [0, 255]."""
    scores = np.asarray(scores, dtype=np.float32)
    if score_code == 3:
        low, high = float(scores.min()), float(scores.max())
        scale = np.float32((high - low) / 255.0)
        offset = np.float32(low)
        if scale == 0:
            return np.zeros(scores.shape, np.uint8), 0.0, float(offset)
        q = np.rint((scores - offset) / scale)
        return np.clip(q, 0, 255).astype(np.uint8), float(scale), float(offset)
    return scores.astype(SCORE_DTYPES[score_code]), 1.0, 0.0


def decode_scores(stored: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Stored scores -> float32, the formula the pooling operator applies too."""
    if stored.dtype == np.uint8:
        values = stored.astype(np.float32)
        values *= np.float32(scale)
        values += np.float32(offset)
        return values
    return stored.astype(np.float32)
