"""Shard format v1: round trips, byte sizes, checksums, quantization, and multi-process reading."""
import multiprocessing as mp
import pickle

import numpy as np
import pytest

from relabel_dali import LabelShardReader, LabelShardWriter, ShardCorruptError
from relabel_dali import format as fmt


def random_map(rng, k=5, height=15, width=15, num_classes=1000):
    scores = rng.normal(0, 3, size=(k, height, width)).astype(np.float32)
    # Distinct ids per location, as a real top-k has.
    class_ids = np.stack([rng.choice(num_classes, size=k, replace=False) for _ in range(height * width)], axis=1)
    return scores, class_ids.reshape(k, height, width)


def write_dataset(root, maps, *, score_dtype="float16", per_shard=4, **geometry):
    k, height, width = maps[0][1].shape
    writer = LabelShardWriter(root, k=k, height=height, width=width, score_dtype=score_dtype, **geometry)
    for start in range(0, len(maps), per_shard):
        with writer.shard(f"labels-{start // per_shard:05d}") as shard:
            for key, scores, class_ids in maps[start:start + per_shard]:
                shard.add(key, scores, class_ids)
    writer.finalize()
    return writer


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    return [(f"n{i % 3:08d}/img_{i:03d}", *random_map(rng)) for i in range(10)]


class TestRecordLayout:
    @pytest.mark.parametrize("dtype, expected", [("float32", 6768), ("float16", 4528), ("uint8", 3392)])
    def test_record_size_5x15x15(self, dtype, expected):
        # 16 bytes of crc/scale/offset/reserved, scores, uint16 ids, padded to 16 bytes.
        geometry = fmt.Geometry(5, 15, 15, 1000, fmt.score_dtype_code(dtype))
        assert geometry.record_dtype.itemsize == expected
        assert expected % fmt.RECORD_ALIGN == 0

    def test_float16_record_fits_target(self):
        assert fmt.Geometry(5, 15, 15, 1000, 2).record_dtype.itemsize <= 4600

    def test_header_is_64_bytes(self):
        assert fmt.HEADER_DTYPE.itemsize == fmt.HEADER_SIZE == 64

    def test_unknown_dtype_name(self):
        with pytest.raises(fmt.FormatError, match="unknown score dtype 'int8'"):
            fmt.score_dtype_code("int8")


class TestRoundTrip:
    @pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
    def test_values_and_file_sizes(self, tmp_path, maps, dtype):
        write_dataset(tmp_path, maps, score_dtype=dtype, per_shard=4)
        reader = LabelShardReader(tmp_path)
        record_size = reader.geometry.record_dtype.itemsize
        sizes = [p.stat().st_size for p in sorted(tmp_path.glob("*.rls"))]
        assert sizes == [64 + 4 * record_size, 64 + 4 * record_size, 64 + 2 * record_size]
        assert len(reader) == 10 and reader.keys == [m[0] for m in maps]
        tolerance = {"float32": 0.0, "float16": 2e-3 * 12, "uint8": None}[dtype]
        for i, (key, scores, class_ids) in enumerate(maps):
            got_scores, got_ids = reader[key]
            assert got_scores.dtype == np.float32 and got_ids.dtype == np.int64
            assert got_scores.shape == got_ids.shape == (5, 15, 15)
            np.testing.assert_array_equal(got_ids, class_ids)
            bound = tolerance if tolerance is not None else (scores.max() - scores.min()) / 255 / 2 * 1.0001
            assert np.max(np.abs(got_scores - scores)) <= bound
            np.testing.assert_array_equal(reader[i][0], got_scores)
        assert reader.verify() == 10

    def test_float32_is_exact(self, tmp_path, maps):
        write_dataset(tmp_path, maps, score_dtype="float32")
        reader = LabelShardReader(tmp_path)
        for key, scores, _ in maps:
            np.testing.assert_array_equal(reader[key][0], scores)

    def test_views_are_read_only_and_zero_copy(self, tmp_path, maps):
        write_dataset(tmp_path, maps)
        record = LabelShardReader(tmp_path).record(3)
        assert record.scores.dtype == np.float16 and record.class_ids.dtype == np.uint16
        assert not record.scores.flags.writeable and not record.class_ids.flags.writeable
        assert not record.scores.flags.owndata

    def test_negative_index_and_errors(self, tmp_path, maps):
        write_dataset(tmp_path, maps)
        reader = LabelShardReader(tmp_path)
        np.testing.assert_array_equal(reader[-1][1], maps[-1][2])
        with pytest.raises(IndexError, match=r"out of range \[0, 10\)"):
            reader[10]
        with pytest.raises(KeyError, match="no label record for key 'missing'"):
            reader["missing"]
        assert maps[0][0] in reader and "missing" not in reader

    def test_single_shard_file(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        reader = LabelShardReader(tmp_path / "labels-00000.rls")
        assert len(reader) == 10
        np.testing.assert_array_equal(reader[maps[4][0]][1], maps[4][2])

    def test_empty_shard_is_allowed(self, tmp_path, maps):
        writer = LabelShardWriter(tmp_path, k=5, height=15, width=15)
        with writer.shard("labels-00000"):
            pass
        with writer.shard("labels-00001") as shard:
            shard.add(*maps[0])
        writer.finalize()
        reader = LabelShardReader(tmp_path)
        assert len(reader) == 1 and reader.verify() == 1


class TestQuantization:
    @pytest.mark.parametrize("seed", range(5))
    def test_uint8_error_bound(self, seed):
        rng = np.random.default_rng(seed)
        scores = rng.normal(0, 5, size=(5, 15, 15)).astype(np.float32)
        stored, scale, offset = fmt.encode_scores(scores, 3)
        error = np.abs(fmt.decode_scores(stored, scale, offset) - scores)
        assert error.max() <= scale / 2 * 1.0001
        assert scale == pytest.approx((scores.max() - scores.min()) / 255, rel=1e-6)

    def test_uint8_constant_map(self):
        stored, scale, offset = fmt.encode_scores(np.full((1, 2, 2), 4.5, np.float32), 3)
        assert scale == 0 and offset == 4.5
        np.testing.assert_array_equal(fmt.decode_scores(stored, scale, offset), 4.5)

    def test_writer_reports_max_error(self, tmp_path, maps):
        writer = LabelShardWriter(tmp_path, k=5, height=15, width=15, score_dtype="uint8")
        with writer.shard("s") as shard:
            errors = [shard.add(*m) for m in maps]
        assert shard.max_error == max(errors) > 0


class TestIntegrity:
    def test_corrupt_record_detected(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        data = bytearray(path.read_bytes())
        record_size = LabelShardReader(tmp_path).geometry.record_dtype.itemsize
        data[64 + 3 * record_size + 100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(ShardCorruptError, match=r"labels-00000.rls: record 3 checksum"):
            LabelShardReader(tmp_path).verify()

    def test_corrupt_header_detected(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        data = bytearray(path.read_bytes())
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(fmt.FormatError, match="header checksum"):
            LabelShardReader(tmp_path)

    def test_bad_magic(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        path.write_bytes(b"NOTASHRD" + path.read_bytes()[8:])
        with pytest.raises(fmt.FormatError, match="not a label shard"):
            LabelShardReader(tmp_path)

    def test_truncated_shard(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(fmt.FormatError, match="truncated"):
            LabelShardReader(tmp_path)

    def test_keys_file_disagreeing_with_shard(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        keys_path = tmp_path / "labels-00000.keys"
        keys_path.write_text("".join(line + "\n" for line in keys_path.read_text().splitlines()[:-1]))
        reader = LabelShardReader(tmp_path)
        np.testing.assert_array_equal(reader[9][1], maps[9][2])  # by number: keys are not needed
        with pytest.raises(fmt.FormatError, match="hold 10 records but the key files hold 9 keys"):
            reader.keys

    def test_missing_index(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no label index"):
            LabelShardReader(tmp_path)

    def test_newer_version_refused(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        header = np.frombuffer(path.read_bytes()[:64], fmt.HEADER_DTYPE).copy()
        header["version"] = 2
        header["header_crc32"] = fmt.checksum(header.tobytes()[:60])
        path.write_bytes(header.tobytes() + path.read_bytes()[64:])
        with pytest.raises(fmt.FormatError, match="format version 2, this reader reads 1"):
            LabelShardReader(tmp_path)


class TestWriterValidation:
    @pytest.fixture
    def shard(self, tmp_path):
        writer = LabelShardWriter(tmp_path, k=2, height=3, width=3, num_classes=10)
        with writer.shard("s") as shard:
            yield shard

    def test_wrong_shape(self, shard):
        with pytest.raises(ValueError, match=r"scores shape \(2, 3, 4\), expected \(2, 3, 3\)"):
            shard.add("a", np.zeros((2, 3, 4)), np.zeros((2, 3, 3), int))

    def test_class_id_out_of_range(self, shard):
        ids = np.zeros((2, 3, 3), int)
        ids[1, 2, 2] = 10
        with pytest.raises(ValueError, match=r"class ids span \[0, 10\], expected within \[0, 9\]"):
            shard.add("a", np.zeros((2, 3, 3)), ids)

    def test_nan_score(self, shard):
        scores = np.zeros((2, 3, 3))
        scores[0, 1, 2] = np.nan
        with pytest.raises(ValueError, match=r"\[0, 1, 2\] is nan"):
            shard.add("a", scores, np.zeros((2, 3, 3), int))

    def test_bad_key(self, shard):
        with pytest.raises(ValueError, match="single-line"):
            shard.add("a\nb", np.zeros((2, 3, 3)), np.zeros((2, 3, 3), int))

    def test_duplicate_key_across_shards(self, tmp_path, maps):
        writer = LabelShardWriter(tmp_path, k=5, height=15, width=15)
        for name in ("a", "b"):
            with writer.shard(name) as shard:
                shard.add(*maps[0])
        with pytest.raises(fmt.FormatError, match="duplicate key .* in shards a and b"):
            writer.finalize()

    def test_failed_shard_leaves_nothing(self, tmp_path, maps):
        writer = LabelShardWriter(tmp_path, k=5, height=15, width=15)
        with pytest.raises(RuntimeError):
            with writer.shard("s") as shard:
                shard.add(*maps[0])
                raise RuntimeError("killed")
        assert list(tmp_path.iterdir()) == [] and not writer.shard_done("s")


def _worker_read(args):
    reader, keys = args
    return [(key, reader[key][0].sum(), reader[key][1].sum()) for key in keys]


class TestMultiprocess:
    def test_pickle_carries_no_mapping(self, tmp_path, maps):
        write_dataset(tmp_path, maps)
        reader = LabelShardReader(tmp_path)
        reader[0]  # open the maps
        blob = pickle.dumps(reader)
        assert len(blob) < 1000  # the path only, not the records
        clone = pickle.loads(blob)
        np.testing.assert_array_equal(clone[5][1], maps[5][2])

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_workers_read_the_same(self, tmp_path, maps, method):
        write_dataset(tmp_path, maps)
        reader = LabelShardReader(tmp_path)
        reader[0]  # maps opened in the parent must not break fork children
        keys = [m[0] for m in maps]
        expected = _worker_read((reader, keys))
        with mp.get_context(method).Pool(2) as pool:
            results = pool.map(_worker_read, [(reader, keys[:5]), (reader, keys[5:])])
        assert results[0] + results[1] == expected
