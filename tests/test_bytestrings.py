"""Byte strings in bulk: each operation against the same thing done string by string in Python."""
import numpy as np
import pytest

from relabel_dali.data import bytestrings as bs

ALPHABET = list("ab/.-_0") + ["é", "😀", "\x01", "\x7f", " "]


def random_strings(seed: int, count: int = 300, longest: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, rng.integers(0, longest))) for _ in range(count)]


class TestStrings:
    @pytest.mark.parametrize("strings", [[], [""], ["a", "", "b"], ["line\nbreak", "x"], ["é😀", "ab" * 80]])
    def test_from_list_round_trip(self, strings):
        s = bs.from_list(strings)
        assert [s.get(i).decode() for i in range(len(s))] == strings
        assert [s.loaded().get(i).decode() for i in range(len(s))] == strings

    @pytest.mark.parametrize("data,lines", [(b"", []), (b"a\n", [b"a"]), (b"a\n\nbc", [b"a", b"", b"bc"])])
    def test_split_lines(self, data, lines):
        s = bs.split_lines(bs.padded(data))
        assert [s.get(i) for i in range(len(s))] == lines

    @pytest.mark.parametrize("loaded", [False, True])
    def test_words_are_the_bytes_zero_padded(self, loaded):
        strings = random_strings(0, longest=30)
        s = bs.from_list(strings)
        s = s.loaded() if loaded else s
        for k in range(s.words):
            expected = [int.from_bytes(text.encode()[8 * k:8 * k + 8].ljust(8, b"\0"), "little") for text in strings]
            assert bs.word(s, k).tolist() == expected

    def test_prefixes_and_cut(self):
        strings = random_strings(1)
        s = bs.from_list(strings).loaded()
        cut_at = np.array([len(t.encode()) // 2 for t in strings])
        heads = s.prefixes(cut_at)
        assert [heads.get(i) for i in range(len(s))] == [t.encode()[:n] for t, n in zip(strings, cut_at)]
        for k in range(heads.words):
            assert np.array_equal(bs.word(heads, k), bs.word(bs.Strings(s.data, s.starts, cut_at), k))
        for strings_ in (s, bs.from_list(strings)):  # from the table, and word by word
            blob, offsets = bs.cut(strings_, strings_.starts + cut_at // 2, strings_.starts + cut_at)
            pieces = [t.encode()[n // 2:n] for t, n in zip(strings, cut_at)]
            assert blob.tobytes() == b"".join(pieces) and np.diff(offsets).tolist() == list(map(len, pieces))

    def test_last_of(self):
        strings = ["a/b/c", "abc", "/x", "x/", "", "a/b"]
        s = bs.from_list(strings)
        assert (bs.last_of(s, ord("/")) - s.starts).tolist() == [t.rfind("/") if "/" in t else -1 - start
                                                                 for t, start in zip(strings, s.starts)]
        one_each = bs.from_list(["a/b", "cc/d"])  # one "/" in every string: the fast path
        assert (bs.last_of(one_each, ord("/")) - one_each.starts).tolist() == [1, 2]


class TestSortOrder:
    @pytest.mark.parametrize("seed", range(5))
    @pytest.mark.parametrize("max_bytes", [2, 8, 64])
    def test_is_pythons_sorted(self, seed, max_bytes):
        strings = random_strings(seed, longest=25 if seed % 2 else 90)
        s = bs.from_list(strings)
        order = bs.sort_order(s, max_bytes=max_bytes)
        assert [strings[i] for i in order] == sorted(strings)
        assert bs.sort_order(s.loaded(), max_bytes=max_bytes).tolist() == order.tolist()

    def test_stable_and_sorted_input(self):
        assert bs.sort_order(bs.from_list(["b", "a", "b", "a"])).tolist() == [1, 3, 0, 2]
        assert bs.is_sorted(bs.from_list(["a", "a", "b"])) and not bs.is_sorted(bs.from_list(["a", "a"]), strict=True)
        assert bs.sort_order(bs.from_list(["a", "ab", "b"])).tolist() == [0, 1, 2]


class TestHashIndex:
    # bits 58-61 leave 3-6 hash bits: most strings collide in the sorted part, so every lookup
    # and duplicate count goes through the settling on bytes.
    @pytest.mark.parametrize("bits", [9, 40, 58, 61])
    @pytest.mark.parametrize("seed", range(4))
    def test_find_and_duplicates_are_a_dict(self, bits, seed):
        rng = np.random.default_rng(seed)
        distinct = sorted(set(random_strings(seed, 200, 12)))
        refs = list(distinct)
        rng.shuffle(refs)
        queries = [refs[i] if rng.random() < 0.7 else f"q{rng.random()}" for i in rng.integers(0, len(refs), 150)]
        ref_index = bs.HashIndex(bs.from_list(refs), bits)
        query_index = bs.HashIndex(bs.from_list(queries), bits)
        assert ref_index.duplicates() == 0
        assert query_index.duplicates() == len(queries) - len(set(queries))
        lookup = {text: i for i, text in enumerate(refs)}
        assert ref_index.find(query_index).tolist() == [lookup.get(text, -1) for text in queries]
        twice = refs + refs[:7] + refs[:2]
        assert bs.HashIndex(bs.from_list(twice), bits).duplicates() == 9

    def test_a_permutation(self):
        refs = [f"k{i}" for i in range(1000)]
        queries = list(reversed(refs))
        bits = 10
        found = bs.HashIndex(bs.from_list(refs), bits).find(bs.HashIndex(bs.from_list(queries), bits))
        assert found.tolist() == list(range(999, -1, -1))

    def test_long_strings_without_a_table(self):
        refs = ["x" * 200 + str(i) for i in range(50)]
        index = bs.HashIndex(bs.from_list(refs), 6)
        assert index.strings.table is None  # longer than TABLE_WORDS words
        assert index.find(bs.HashIndex(bs.from_list(refs[::-1] + ["nope"]), 6)).tolist() == list(range(49, -1, -1)) + [-1]
