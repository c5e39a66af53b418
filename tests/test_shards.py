"""Shard format v2: round trips, byte sizes, checksums, quantization, and multi-process reading."""
import json
import multiprocessing as mp
import pickle
import zlib

import numpy as np
import pytest

from relabel_dali import LabelShardReader, LabelShardWriter, ShardCorruptError
from relabel_dali.store import format as fmt
from relabel_dali.store.writer import SourcesChangedError


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
    def test_every_corrupt_record_listed(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=4)
        record_size = LabelShardReader(tmp_path).geometry.record_dtype.itemsize
        for shard, row in (("labels-00000.rls", 1), ("labels-00000.rls", 3), ("labels-00002.rls", 0)):
            data = bytearray((tmp_path / shard).read_bytes())
            data[64 + row * record_size + 40] ^= 0x01
            (tmp_path / shard).write_bytes(bytes(data))
        reader = LabelShardReader(tmp_path)
        seen = []
        errors = [str(e) for e in reader.corrupt_records(on_shard=seen.append)]
        assert seen == [4, 4, 2]
        # Keys not read yet (workers never read them): shard and row only.
        expected = [("labels-00000.rls", 1, maps[1][0]), ("labels-00000.rls", 3, maps[3][0]),
                    ("labels-00002.rls", 0, maps[8][0])]
        assert len(errors) == 3
        for error, (shard, row, _) in zip(errors, expected):
            assert f"{shard}: record {row} checksum" in error
        reader.keys
        errors = [str(e) for e in reader.corrupt_records()]
        for error, (shard, row, key) in zip(errors, expected):
            assert f"{shard}: record {row} (key {key!r}) checksum" in error

    def test_index_holds_each_keys_file_checksum(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=4)
        index = json.loads((tmp_path / "index.json").read_text())
        for shard in index["shards"]:
            assert shard["keys_crc32"] == zlib.crc32((tmp_path / shard["keys"]).read_bytes())

    def test_swapped_keys_refused(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        keys_path = tmp_path / "labels-00000.keys"
        lines = keys_path.read_text().splitlines()
        lines[2], lines[5] = lines[5], lines[2]
        keys_path.write_text("".join(line + "\n" for line in lines))
        reader = LabelShardReader(tmp_path)
        with pytest.raises(fmt.FormatError, match="labels-00000.keys: keys file checksum .* changed after packing"):
            reader.index_of(maps[0][0])
        with pytest.raises(fmt.FormatError, match="changed after packing"):
            reader.verify()

    def test_corrupt_record_detected(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        data = bytearray(path.read_bytes())
        record_size = LabelShardReader(tmp_path).geometry.record_dtype.itemsize
        data[64 + 3 * record_size + 100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(ShardCorruptError, match=r"labels-00000.rls: record 3 \(key 'n00000000/img_003'\) checksum"):
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
        with pytest.raises(fmt.FormatError, match="labels-00000.keys: keys file checksum .* 9 keys for 10 records"):
            reader.keys

    def test_missing_index(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no label index"):
            LabelShardReader(tmp_path)

    @pytest.mark.parametrize("version, message", [(fmt.VERSION + 1, "this reader reads"),
                                                  (1, "written by an older relabel_dali .* pack it again")])
    def test_other_shard_version_refused(self, tmp_path, maps, version, message):
        write_dataset(tmp_path, maps, per_shard=100)
        path = tmp_path / "labels-00000.rls"
        header = np.frombuffer(path.read_bytes()[:64], fmt.HEADER_DTYPE).copy()
        header["version"] = version
        header["header_crc32"] = fmt.checksum(header.tobytes()[:60])
        path.write_bytes(header.tobytes() + path.read_bytes()[64:])
        with pytest.raises(fmt.FormatError, match=f"format version {version}, this reader reads {fmt.VERSION}"):
            LabelShardReader(tmp_path)
        with pytest.raises(fmt.FormatError, match=message):
            LabelShardReader(tmp_path)

    def test_version_1_index_refused_with_advice(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        index = json.loads((tmp_path / "index.json").read_text())
        index["version"] = 1
        for shard in index["shards"]:
            del shard["keys_crc32"]
        (tmp_path / "index.json").write_text(json.dumps(index))
        with pytest.raises(fmt.FormatError, match="index.json: format version 1, this reader reads 2: written by "
                                                  "an older relabel_dali whose index does not checksum"):
            LabelShardReader(tmp_path)

    def test_index_entry_without_keys_checksum(self, tmp_path, maps):
        write_dataset(tmp_path, maps, per_shard=100)
        index = json.loads((tmp_path / "index.json").read_text())
        del index["shards"][0]["keys_crc32"]
        (tmp_path / "index.json").write_text(json.dumps(index))
        with pytest.raises(fmt.FormatError, match="shard entry 0 lacks keys_crc32"):
            LabelShardReader(tmp_path)


class TestSourcesRecord:
    def write(self, tmp_path, sources):
        writer = LabelShardWriter(tmp_path / "out", k=1, height=1, width=1, num_classes=4, source_root=tmp_path)
        with writer.shard("s", sources=sources) as shard:
            for key in sorted(sources):
                shard.add(key, np.ones((1, 1, 1)), np.zeros((1, 1, 1), int))
        return writer

    @pytest.fixture
    def sources(self, tmp_path):
        for name in ("a", "b"):
            (tmp_path / f"{name}.pt").write_bytes(b"123")
        return {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"}

    def test_recorded_and_accepted_unchanged(self, tmp_path, sources):
        writer = self.write(tmp_path, sources)
        recorded = json.loads(writer.sources_path("s").read_text())["sources"]
        stat_a = (tmp_path / "a.pt").stat()
        assert recorded[0] == ["a", "a.pt", 3, stat_a.st_mtime_ns] and [row[0] for row in recorded] == ["a", "b"]
        assert writer.shard_done("s", sources=sources)

    def test_changed_file_named(self, tmp_path, sources):
        writer = self.write(tmp_path, sources)
        (tmp_path / "b.pt").write_bytes(b"1234")
        with pytest.raises(SourcesChangedError, match=r"1 source file\(s\) changed \(first: key 'b', b.pt, 3 -> 4 bytes"):
            writer.shard_done("s", sources=sources)

    def test_other_keys_named(self, tmp_path, sources):
        writer = self.write(tmp_path, sources)
        (tmp_path / "c.pt").write_bytes(b"123")
        other = {"a": sources["a"], "c": tmp_path / "c.pt"}
        with pytest.raises(SourcesChangedError, match=r"1 key\(s\) not in the earlier run \(first: 'c'\); "
                                                      r"1 key\(s\) of the earlier run not in this one \(first: 'b'\)"):
            writer.shard_done("s", sources=other)

    def test_shard_without_record_refused(self, tmp_path, sources):
        writer = self.write(tmp_path, sources)
        writer.sources_path("s").unlink()
        assert writer.shard_done("s")  # no sources asked for: geometry and keys only
        with pytest.raises(SourcesChangedError, match="without a record of its source files"):
            writer.shard_done("s", sources=sources)


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

    def test_float16_overflow_refused(self, shard):
        scores = np.zeros((2, 3, 3))
        scores[1, 0, 2] = 1e6
        with pytest.raises(ValueError, match=r"score 1e\+06 at \[k, y, x\] = \[1, 0, 2\] does not fit float16"):
            shard.add("a", scores, np.zeros((2, 3, 3), int))
        scores[1, 0, 2] = 65504  # the largest finite float16 is stored as is
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
