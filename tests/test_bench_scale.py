"""tools/bench_scale.py end to end on a small simulated dataset: the JSON's figures against the same
quantities measured independently here (no speed is asserted)."""
import json
import pickle
from pathlib import Path

import pytest

from relabel_dali.store.reader import LabelShardReader
from relabel_dali.data.listing import list_images
from tools import bench_scale

ROOT = Path(__file__).resolve().parents[1]


def test_report_matches_an_independent_build(tmp_path):
    out = tmp_path / "scale.json"
    assert bench_scale.main(["--samples", "3000", "--classes", "7", "--json", str(out), "--tmp", str(tmp_path)]) == 0
    result = json.loads(out.read_text())["sizes"]["custom-3000"]
    assert (result["samples"], result["classes"]) == (3000, 7)
    # The same simulated data, built again and measured here.
    image_root, file_list, label_root = bench_scale.make_dataset(tmp_path / "again", 3000, 7)
    listing = list_images(image_root, file_list=file_list)
    reader = LabelShardReader(label_root)
    assert len(listing) == len(reader) == 3000 and set(reader.keys) == set(listing.keys)
    assert reader.keys == sorted(reader.keys)  # as the packers write them
    assert sorted(set(listing.labels.tolist())) == list(range(7))
    source, _, _ = bench_scale.build_source(image_root, file_list, label_root, 7, tmp_path / "cache")
    assert source.listing.file is not None and len(list((tmp_path / "cache").glob("*.listing"))) == 1
    # The same bytes but for the temporary folder names inside the pickled paths.
    assert result["pickled_mb"] == pytest.approx(len(pickle.dumps(source)) / 2 ** 20, abs=200 / 2 ** 20)
    assert result["listing_mb"] == pytest.approx(source.listing.nbytes / 2 ** 20)
    assert result["epoch_order_mb"] == pytest.approx(source.epoch_slots(1).nbytes / 2 ** 20)
    for key, verdict in result["verdicts"].items():
        assert verdict["target"] == bench_scale.targets(3000)[key]
        assert verdict["met"] == (verdict["measured"] <= verdict["target"])
    assert set(result["verdicts"]) == set(bench_scale.TARGETS["imagenet-21k"])
    assert set(result["worker_mb"]) == {"spawn", "spawn_mapped", "fork"}
    assert result["listing_file_mb"] >= result["listing_mb"] - 0.01


def test_targets_by_size():
    assert bench_scale.targets(1_281_167) == bench_scale.TARGETS["imagenet-1k"]
    assert bench_scale.targets(13_153_500)["build_s"] == 15.0
    assert bench_scale.targets(10_000_000)["pickled_mb"] == 1.0


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_scale.main(["--sizes", "imagenet-5k", "--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "unknown ['imagenet-5k']" in capsys.readouterr().err
