"""Many byte strings at once: one buffer cut by start offsets and lengths.

At ImageNet-21k size the listing holds 13 million image paths and the label shards as many keys.
Per-string Python work was what cost: a sort of 13M ``str`` and a dict of 13M keys took over a
minute. Here the strings are read out of the buffer as 64-bit words into one ``[n, words]`` table,
so a sort is a radix sort of 16-bit digits (``np.lexsort``), finding a byte or cutting a piece out
of every string is a masked pass over the table, and a lookup is a sort of 64-bit hashes
(``np.sort``) whose hits are then confirmed on the bytes themselves.

Orders are those of Python's ``sorted`` on the decoded strings: UTF-8 keeps code-point order byte
by byte, and a string that is a prefix of another sorts first here as well, since words are read
zero-padded and no path or key holds a NUL byte.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

TABLE_WORDS = 16  # strings up to 128 bytes are held as a table; longer ones are read word by word
PAD = 8 * TABLE_WORDS + 8  # zero bytes after the strings: a table row read at any start stays inside
_KEEP = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [2 ** 64 - 1], np.uint64)  # the first n bytes
_CHUNK_BYTES = 64 << 20  # scratch per step of ``concat``


@dataclass(frozen=True)
class Strings:
    """``len(starts)`` strings in ``data`` (uint8, with ``PAD`` spare bytes after the last one).

    ``table``, once ``loaded()``: row ``i`` holds string ``i``'s bytes, zero-padded, as
    little-endian uint64 words (``[n, words]``): sorting, hashing, comparing and cutting then
    read it instead of the scattered buffer."""
    data: np.ndarray
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64
    table: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> bytes:
        start = int(self.starts[i])
        return self.data[start:start + int(self.lengths[i])].tobytes()

    def take(self, rows) -> "Strings":
        if isinstance(rows, slice):
            table = None if self.table is None else self.table[rows]
            return Strings(self.data, self.starts[rows], self.lengths[rows], table)
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else rows
        table = None if self.table is None else np.take(self.table, rows, axis=0)  # 2x [rows] here
        return Strings(self.data, np.take(self.starts, rows), np.take(self.lengths, rows), table)

    def part(self, starts, lengths) -> "Strings":
        """Other strings of the same buffer (each string's suffix, its file stem...)."""
        return Strings(self.data, np.asarray(starts, np.int64), np.asarray(lengths, np.int64))

    def prefixes(self, lengths) -> "Strings":
        """The first ``lengths[i]`` bytes of each string (its folder, its key), table included."""
        lengths = np.asarray(lengths, np.int64)
        table = None
        if self.table is not None:
            count = max((int(lengths.max(initial=0)) + 7) // 8, 1)
            table = np.empty((len(self), count), np.dtype("<u8"))
            for k in range(count):
                table[:, k] = _masked(self.table[:, k], lengths, k)
        return Strings(self.data, self.starts, lengths, table)

    def loaded(self) -> "Strings":
        """The same strings with their table (unless longer than ``TABLE_WORDS`` words)."""
        if self.table is not None or self.words > TABLE_WORDS:
            return self
        return Strings(self.data, self.starts, self.lengths, _words(self, 0, max(self.words, 1)))

    @property
    def words(self) -> int:
        return (int(self.lengths.max(initial=0)) + 7) // 8

    @property
    def matrix(self) -> np.ndarray:
        """The table as bytes, ``[n, 8 * words]``."""
        return self.table.view(np.uint8)


def read_padded(path: str | os.PathLike) -> np.ndarray:
    """A file's bytes followed by ``PAD`` zeros, read once into one array."""
    size = os.path.getsize(path)
    buffer = np.zeros(size + PAD, np.uint8)
    view = memoryview(buffer)[:size]
    with open(path, "rb") as handle:
        done = 0
        while done < size:
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"{path}: shorter than its size while being read")
            done += got
    return buffer


def padded(data: bytes) -> np.ndarray:
    buffer = np.zeros(len(data) + PAD, np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    return buffer


def split_lines(buffer: np.ndarray) -> Strings:
    """The ``\\n``-separated lines of a padded buffer (a last line without ``\\n`` counts too)."""
    size = len(buffer) - PAD
    ends = np.flatnonzero(buffer[:size] == 10)
    if size and buffer[size - 1] != 10:
        ends = np.append(ends, size)
    starts = np.empty(len(ends), np.int64)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    return Strings(buffer, starts, ends - starts)


def from_list(strings: list[str]) -> Strings:
    joined = "\n".join(strings)
    if joined.count("\n") == max(len(strings) - 1, 0):
        return split_lines(padded(joined.encode() + (b"\n" if strings else b"")))
    encoded = [string.encode() for string in strings]  # a name holding a newline
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    starts = np.zeros(len(encoded), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return Strings(padded(b"".join(encoded)), starts, lengths)


def _masked(values: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Word ``k`` of strings of ``lengths`` with the bytes past each end zeroed (only the words
    that some string ends inside need the work)."""
    if len(lengths) and int(lengths.min()) >= 8 * (k + 1):
        return values
    if not len(lengths) or int(lengths.max()) <= 8 * k:
        return np.zeros(len(lengths), np.uint64)
    remaining = lengths - 8 * k
    np.clip(remaining, 0, 8, out=remaining)
    return values & _KEEP[remaining]


def _words(s: Strings, first: int, count: int) -> np.ndarray:
    """Words ``first .. first+count-1`` of each string, ``[n, count]``, zero past its end."""
    unaligned = np.ndarray((len(s.data) - 7,), np.dtype("<u8"), s.data, 0, (1,))
    out = np.empty((len(s), count), np.dtype("<u8"))
    clip = int(s.starts.max(initial=0)) + 8 * (first + count) > len(s.data) - 8
    for k in range(first, first + count):
        positions = s.starts + 8 * k
        if clip:
            np.minimum(positions, len(s.data) - 8, out=positions)
        out[:, k - first] = _masked(unaligned[positions], s.lengths, k)
    return out


def word(s: Strings, k: int) -> np.ndarray:
    """Bytes ``8k .. 8k+7`` of each string as they lie in memory (a little-endian uint64), zero
    past the string's end."""
    if s.table is not None:
        return s.table[:, k] if k < s.table.shape[1] else np.zeros(len(s), np.uint64)
    return _words(s, k, 1)[:, 0]


def ordered(word_values: np.ndarray) -> np.ndarray:
    """Words as big-endian numbers: comparing them compares the bytes in order."""
    return word_values.astype(">u8").view("<u8")


def last_of(s: Strings, byte: int) -> np.ndarray:
    """Position (in ``data``) of each string's last ``byte``, ``-1`` where it has none. For
    strings in buffer order (lines), one pass over the buffer."""
    ends = s.starts + s.lengths
    found = np.flatnonzero(s.data[:int(ends.max(initial=0))] == byte)
    if len(found) == len(s) and ((found >= s.starts) & (found < ends)).all():
        return found  # one in every string (a class folder's "/", a file's only ".")
    if not len(found):
        return np.full(len(s), -1, np.int64)
    at = np.searchsorted(found, ends) - 1
    positions = found[np.maximum(at, 0)]
    return np.where((at >= 0) & (positions >= s.starts), positions, -1)


def is_sorted(s: Strings, strict: bool = False) -> bool:
    """Whether the strings are in order already (file lists often are); ``strict``: and no
    string repeats the one before it."""
    undecided = np.ones(max(len(s) - 1, 0), bool)
    for k in range(s.words):
        values = ordered(word(s, k))
        before, after = values[:-1], values[1:]
        if (undecided & (before > after)).any():
            return False
        undecided &= before == after
    return not (strict and undecided.any())


def sort_order(s: Strings, max_bytes: int = 64) -> np.ndarray:
    """The stable order that sorts the strings bytewise: a radix sort of the first ``max_bytes``
    bytes in 16-bit digits; ties between longer strings are settled in Python (rare)."""
    n = len(s)
    if n < 2 or is_sorted(s):
        return np.arange(n)
    width = min(int(s.lengths.max()), max_bytes)
    table = s.table[:, :(width + 7) // 8] if s.table is not None else _words(s, 0, (width + 7) // 8)
    # Each row's bytes as big-endian 16-bit digits, turned into one native row per digit at once.
    pairs = table.view(">u2")[:, :(width + 1) // 2].T.astype(np.uint16, order="C")
    digits = [digit for digit in pairs if (digit != digit[0]).any()]  # a digit all strings share orders nothing
    order = np.lexsort(digits[::-1]) if digits else np.arange(n)
    if int(s.lengths.max()) > max_bytes:
        order = _settle_long_ties(s, order, digits, max_bytes)
    return order


def _settle_long_ties(s: Strings, order: np.ndarray, digits: list, max_bytes: int) -> np.ndarray:
    tied = np.ones(len(order) - 1, bool)
    for digit in digits:
        sorted_digit = digit[order]
        tied &= sorted_digit[1:] == sorted_digit[:-1]
    long = s.lengths[order] > max_bytes  # equal up to max_bytes and one goes on: only Python can tell
    tied &= long[1:] | long[:-1]
    order = order.copy()
    rows = np.flatnonzero(tied)
    group_starts = rows[np.r_[True, rows[1:] != rows[:-1] + 1]] if len(rows) else rows
    for first in group_starts.tolist():
        last = first + 1
        while last < len(tied) and tied[last]:
            last += 1
        members = order[first:last + 1]
        order[first:last + 1] = sorted(members.tolist(), key=s.get)
    return order


_MULTIPLIERS = np.random.default_rng(0x5EED).integers(1, 2 ** 63, TABLE_WORDS + 1, dtype=np.uint64) * 2 + 1


def hash64(s: Strings) -> np.ndarray:
    """A 64-bit hash of each string's bytes: its length and words, each times its own odd
    constant, summed, then avalanched (MurmurHash3's finalizer). Words past a string's end are
    zero, so the hash does not depend on its neighbours. Strings that differ in one word never
    share the sum; lookups confirm every hit on the bytes, so the hash decides speed only."""
    multipliers = _MULTIPLIERS if s.words < len(_MULTIPLIERS) else \
        np.random.default_rng(0x5EED).integers(1, 2 ** 63, s.words + 1, dtype=np.uint64) * 2 + 1
    h = s.lengths.astype(np.uint64) * multipliers[0]
    for k in range(s.words):
        h += word(s, k) * multipliers[k + 1]
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def equal(a: Strings, b: Strings) -> np.ndarray:
    """``a[i] == b[i]`` for each ``i`` (same count of strings), compared on the bytes."""
    same = a.lengths == b.lengths
    if a.table is not None and b.table is not None:  # equal lengths: the wider table's extra words are 0
        for k in range(min(a.table.shape[1], b.table.shape[1])):
            same &= a.table[:, k] == b.table[:, k]
        return same
    for k in range(max(a.words, b.words)):
        same &= word(a, k) == word(b, k)
    return same


def same_as_previous(s: Strings) -> np.ndarray:
    """``s[i] == s[i - 1]`` (False for the first string)."""
    same = np.zeros(len(s), bool)
    if len(s) > 1:
        same[1:] = equal(s.take(slice(1, None)), s.take(slice(None, -1)))
    return same


def first_seen_codes(s: Strings, limit: int) -> tuple[np.ndarray, list[bytes]] | None:
    """A code per string, numbering the distinct strings in order of first appearance; None when
    there are more than ``limit`` of them. For few distinct strings (file suffixes)."""
    words = [word(s, k) for k in range(s.words)]
    codes = np.full(len(s), -1, np.int32)
    table: list[bytes] = []
    row = 0
    while row < len(s):
        if len(table) == limit:
            return None
        same = s.lengths == s.lengths[row]
        for values in words:
            same &= values == values[row]
        codes[same] = len(table)
        table.append(s.get(row))
        left = np.flatnonzero(codes[row:] < 0)
        row = row + int(left[0]) if len(left) else len(s)
    return codes, table


def cut(s: Strings, begins: np.ndarray, ends: np.ndarray, offsets_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Bytes ``begins[i] .. ends[i]`` (positions in ``data``) of each string, end to end: (uint8
    blob, offsets [n + 1]), piece ``i`` being ``blob[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(len(s) + 1, offsets_dtype)
    np.cumsum(ends - begins, out=offsets[1:])
    if s.table is None:
        return concat(s.part(begins, ends - begins), offsets_dtype)
    column = np.arange(s.matrix.shape[1], dtype=np.uint8)  # byte positions in a row fit in uint8
    first = (begins - s.starts).astype(np.uint8)
    # column - first wraps around below first: one unsigned comparison keeps first <= column < end
    within = (column[None, :] - first[:, None]) < (ends - begins).astype(np.uint8)[:, None]
    return s.matrix[within], offsets


def concat(s: Strings, offsets_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """The strings end to end: (uint8 blob, offsets [n + 1]); string ``i`` is
    ``blob[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(len(s) + 1, offsets_dtype)
    np.cumsum(s.lengths, out=offsets[1:])
    blob = np.empty(int(offsets[-1]), np.uint8)
    words = max(s.words, 1)
    step = max(1, _CHUNK_BYTES // (8 * words))
    columns = np.arange(8 * words)
    for first in range(0, len(s), step):
        part = s.take(slice(first, first + step))
        block = part.table if part.table is not None else _words(part, 0, words)
        keep = columns[None, :] < part.lengths[:, None]
        blob[int(offsets[first]):int(offsets[first + len(part)])] = block.view(np.uint8)[keep]
    return blob, offsets


class HashIndex:
    """The strings sorted by hash, for lookups and duplicate counts.

    Hashes are sorted with each string's row number in their low ``bits`` bits (one ``np.sort``
    of uint64, several times faster than an argsort), so two strings whose hashes agree in the
    high bits fall into one group; a group of more than one is settled on the bytes.
    """

    def __init__(self, strings: Strings, bits: int):
        self.strings, self.bits = strings.loaded(), bits
        low = np.uint64((1 << bits) - 1)
        packed = np.sort((hash64(self.strings) & ~low) | np.arange(len(strings), dtype=np.uint64))
        self.high = packed & ~low
        self.rows = (packed & low).astype(np.int64)

    def _groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(first, size) of each run of two or more equal high parts."""
        same = np.r_[False, self.high[1:] == self.high[:-1], False]
        edges = np.flatnonzero(same[1:] != same[:-1])
        firsts, lasts = edges[0::2], edges[1::2]
        return firsts, lasts - firsts + 1

    def duplicates(self) -> int:
        """How many strings equal an earlier one."""
        firsts, sizes = self._groups()
        pairs = firsts[sizes == 2]
        count = int(equal(self.strings.take(self.rows[pairs]), self.strings.take(self.rows[pairs + 1])).sum())
        for first, size in zip(firsts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
            members = [self.strings.get(row) for row in self.rows[first:first + size].tolist()]
            count += len(members) - len(set(members))
        return count

    def find(self, queries: "HashIndex") -> np.ndarray:
        """Each query's row here (``-1``: absent), in the queries' own order. The strings here
        must be distinct (``duplicates() == 0``)."""
        if queries.bits != self.bits:
            raise ValueError("both indexes need the same bits")
        n = len(self.high)
        result = np.full(len(queries.high), -1, np.int64)
        if not n:
            return result
        if n == len(queries.high) and (self.high == queries.high).all() and (self.high[1:] != self.high[:-1]).all():
            result[queries.rows] = self.rows  # as many of each, all hashes distinct: pair them in order
            at = more = np.zeros(0, np.int64)
        else:
            at = np.searchsorted(self.high, queries.high)
            hit = self.high[np.minimum(at, n - 1)] == queries.high
            hit &= at < n
            more = hit & (at + 1 < n)
            more &= self.high[np.minimum(at + 1, n - 1)] == queries.high
            single = hit & ~more
            result[queries.rows[single]] = self.rows[at[single]]
        # Confirmed on the bytes, in the queries' order (their table is read in sequence).
        candidates = np.flatnonzero(result >= 0)
        mine, theirs = self.strings, queries.strings
        if mine.table is not None and theirs.table is not None:  # no starts: rows and lengths decide
            rows = result[candidates]
            same = equal(Strings(mine.data, rows, np.take(mine.lengths, rows), np.take(mine.table, rows, axis=0)),
                         Strings(theirs.data, candidates, np.take(theirs.lengths, candidates),
                                 np.take(theirs.table, candidates, axis=0)))
        else:
            same = equal(theirs.take(candidates), mine.take(result[candidates]))
        result[candidates[~same]] = -1
        for i in np.flatnonzero(more).tolist():
            wanted = queries.strings.get(queries.rows[i])
            j = int(at[i])
            while j < n and self.high[j] == queries.high[i]:
                if self.strings.get(self.rows[j]) == wanted:
                    result[queries.rows[i]] = self.rows[j]
                    break
                j += 1
        return result
