"""relabel_dali.data.official: the official-style comparison loader pairs each image with its own map
and crop, and pools like the native operator."""
import torch

from relabel_dali.data.benchdata import make_benchmark_data
from relabel_dali.store.labelmaps import to_canonical
from relabel_dali.data.official import OfficialStyleDataset, OfficialStyleLoader
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import official_label_pooling


def test_dataset_items_and_loader_targets(tmp_path):
    data = make_benchmark_data(tmp_path, 6, classes=2, sizes=((40, 48), (30, 36)))
    dataset = OfficialStyleDataset(data.image_root, data.pt_root, 16)
    maps, coords = [], []
    for i, path in enumerate(dataset.paths):
        image, label, box, label_map = dataset[i]
        assert image.shape == (3, 16, 16) and label == int(path.parent.name[-1])
        top, left, bottom, right = box.tolist()
        assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
        expected = torch.load(data.pt_root / path.relative_to(data.image_root).with_suffix(".pt"), weights_only=True)
        assert torch.equal(label_map, expected)
        maps.append(label_map)
        coords.append(box)
    # The official pooling of official-layout maps over (top, left, bottom, right) equals the native
    # operator on the canonical maps over (x0, y0, x1, y1) = (left, top, right, bottom).
    canonical = [to_canonical(m.numpy(), topk=5, num_classes=1000, layout="official") for m in maps]
    scores = torch.stack([torch.from_numpy(s) for s, _ in canonical])
    class_ids = torch.stack([torch.from_numpy(c) for _, c in canonical])
    boxes = torch.stack(coords)[:, [1, 0, 3, 2]]
    torch.testing.assert_close(official_label_pooling(torch.stack(maps), torch.stack(coords)),
                               pool_labels(scores, class_ids, boxes), atol=1e-6, rtol=0)

    loader = OfficialStyleLoader(data.image_root, data.pt_root, batch_size=4, image_size=16, workers=0)
    (batch,) = list(loader)
    assert batch["images"].shape == (4, 3, 16, 16) and batch["targets"].shape == (4, 1000)
    torch.testing.assert_close(batch["targets"].sum(1), torch.ones(4))
    plain = OfficialStyleLoader(data.image_root, None, batch_size=6, image_size=16, workers=0)
    (batch,) = list(plain)
    assert sorted(batch["targets"].argmax(1).tolist()) == [0, 0, 0, 1, 1, 1]
    assert torch.equal(batch["targets"].sum(1), torch.ones(6))
