"""End to end: official-format .pt label maps -> pack_labels --layout official -> LabelPool equals the
official LabelPooling computed on the original files with the official crop coordinates."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from relabel_dali.ops.pooling import pool_labels
from relabel_dali.store.reader import LabelShardReader
from relabel_dali.ops.reference import official_label_pooling, random_topk_maps

REPO = Path(__file__).resolve().parent.parent


def official_crop_coords(image_h, image_w, generator):
    """A RandomResizedCrop-style window in pixels, as the official transform reports it:
    (top/H, left/W, bottom/H, right/W), bottom and right being top + h and left + w."""
    h = int(torch.randint(1, image_h + 1, (1,), generator=generator))
    w = int(torch.randint(1, image_w + 1, (1,), generator=generator))
    top = int(torch.randint(0, image_h - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, image_w - w + 1, (1,), generator=generator))
    return (top / image_h, left / image_w, (top + h) / image_h, (left + w) / image_w)


class TestOfficialParity:
    def test_packed_maps_pool_to_official_numbers(self, tmp_path):
        g = torch.Generator().manual_seed(41)
        n, k, size = 24, 5, 15
        scores, class_ids = random_topk_maps(n, k, size, size, 1000, g)
        # Official files: [2, k, A, B] floats, read by the official code with A horizontal.
        official = torch.stack([scores, class_ids.float()], 1)
        src = tmp_path / "relabel_pt" / "n01440764"
        src.mkdir(parents=True)
        for i in range(n):
            torch.save(official[i].clone(), src / f"img_{i:03d}.pt")
        out = tmp_path / "labels"
        result = subprocess.run([sys.executable, str(REPO / "tools" / "pack_labels.py"), str(tmp_path / "relabel_pt"),
                                 str(out), "--layout", "official", "--dtype", "float32", "--topk", str(k)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

        reader = LabelShardReader(out)
        coords = torch.tensor([official_crop_coords(375, 500, g) for _ in range(n)], dtype=torch.float32)
        packed_scores, packed_ids = zip(*(reader[f"n01440764/img_{i:03d}"] for i in range(n)))
        packed_scores = torch.from_numpy(np.stack(packed_scores))
        packed_ids = torch.from_numpy(np.stack(packed_ids))
        # Canonical boxes (x0, y0, x1, y1) of the same crops.
        boxes = coords[:, [1, 0, 3, 2]]
        got = pool_labels(packed_scores, packed_ids, boxes)
        expected = official_label_pooling(official, coords)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
