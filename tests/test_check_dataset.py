"""tools/check_dataset.py: each bad-input case reported (and only those), exit codes, JSON."""
import json
from pathlib import Path

from conftest import encode, gradient_image, make_dataset

from relabel_dali import LabelShardReader
from tools import check_dataset

ROOT = Path(__file__).resolve().parents[1]


class TestCheckDataset:
    def test_clean_dataset_passes(self, tmp_path, capsys):
        image_root, label_root, _ = make_dataset(tmp_path)
        assert check_dataset.main([str(image_root), "--labels", str(label_root)]) == 0
        assert "8 images, 8 label records: 0 problem(s)" in capsys.readouterr().out

    def test_every_problem_reported(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path, skip_records=("c1/img1",), extra_records=("c7/ghost",))
        truncated = image_root / "c0" / "img0.JPEG"
        truncated.write_bytes(truncated.read_bytes()[:-400])
        (image_root / "c0" / "img2.JPEG").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9")
        (image_root / "c0" / "img3.JPEG").write_bytes(encode(gradient_image(20, 20), "JPEG", "CMYK"))
        (image_root / "c1" / "img0.JPEG").write_bytes(encode(gradient_image(20, 20), "PNG"))
        out = tmp_path / "report" / "check.json"
        assert check_dataset.main([str(image_root), "--labels", str(label_root), "--json", str(out)]) == 1
        report = json.loads(out.read_text())
        problems = {(p["file"], p["kind"]) for p in report["problems"]}
        assert problems == {("c0/img0.JPEG", "bad image"), ("c0/img2.JPEG", "bad image"),
                            ("c1/img1.JPEG", "no label record"), ("c7/ghost", "label record without image")}
        details = {p["file"]: p["detail"] for p in report["problems"]}
        assert "truncated JPEG" in details["c0/img0.JPEG"] and "does not decode" in details["c0/img2.JPEG"]
        notes = {n["file"]: n["detail"] for n in report["notes"]}
        assert notes == {"c0/img3.JPEG": "CMYK colour mode", "c1/img0.JPEG": "PNG file named .JPEG"}

    def test_corrupt_shard_reported(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path)
        shard = label_root / "labels-00000.rls"
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0xFF
        shard.write_bytes(bytes(raw))
        report = check_dataset.check(image_root, label_root)
        last_key = LabelShardReader(label_root).keys[-1]
        assert [(p["file"], p["kind"]) for p in report["problems"]] == [(last_key, "corrupt label record")]
        assert "checksum" in report["problems"][0]["detail"]

    def test_images_only(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        assert check_dataset.main([str(image_root)]) == 0

    def test_unreadable_root_exits_2(self, tmp_path, capsys):
        assert check_dataset.main([str(tmp_path / "missing")]) == 2
        assert "not a folder" in capsys.readouterr().err

    def test_missing_label_index_exits_2(self, tmp_path, capsys):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        (tmp_path / "empty").mkdir()
        assert check_dataset.main([str(image_root), "--labels", str(tmp_path / "empty")]) == 2
        assert "no label index" in capsys.readouterr().err
