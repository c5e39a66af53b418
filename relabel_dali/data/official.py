"""The official ReLabel input path, for comparison only: a torch DataLoader over PIL-decoded
images with RandomResizedCrop (its crop box kept), flip, colour jitter, lighting and normalize,
plus each image's per-image ``.pt`` top-k map; the training loop then scatters the maps into dense
``[B, 1000, H, W]`` maps and pools them with ``roi_align`` (:func:`reference.official_label_pooling`).

Used by tools/bench_loader.py and tools/gpu_check; not imported by the training path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from relabel_dali.data import augment
from relabel_dali.ops.reference import official_label_pooling


class OfficialStyleDataset(torch.utils.data.Dataset):
    """``(image [3, S, S], class index, coords, label map)`` per image; ``coords`` = (top/H,
    left/W, bottom/H, right/W) of the crop, as the official code passes them to its pooling.
    Class indices follow the sorted folder names; without ``pt_root`` the label map is empty."""

    def __init__(self, image_root: Path, pt_root: Path | None, image_size: int):
        from torchvision import transforms

        self.paths = sorted(Path(image_root).glob("*/*.JPEG"))
        if not self.paths:
            raise FileNotFoundError(f"{image_root}: no <class>/<image>.JPEG files")
        self.classes = {name: i for i, name in enumerate(sorted({p.parent.name for p in self.paths}))}
        self.image_root, self.pt_root = Path(image_root), None if pt_root is None else Path(pt_root)
        self.crop = transforms.RandomResizedCrop(image_size, scale=augment.RANDOM_AREA,
                                                 ratio=augment.RANDOM_ASPECT_RATIO)
        self.rest = transforms.Compose([
            transforms.RandomHorizontalFlip(), transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor()])
        self.normalize = transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)
        self.eig = torch.tensor(augment.PCA_EIGVEC) * torch.tensor(augment.PCA_EIGVAL)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.transforms import functional as F

        path = self.paths[i]
        image = Image.open(path).convert("RGB")
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        coords = torch.tensor([top / image.height, left / image.width,
                               (top + h) / image.height, (left + w) / image.width])
        image = F.resized_crop(image, top, left, h, w, self.crop.size, antialias=True)
        image = self.rest(image)
        image = image + (self.eig @ torch.randn(3).mul_(augment.LIGHTING_STD)).view(3, 1, 1)
        label_map = torch.zeros(0)
        if self.pt_root is not None:
            label_map = torch.load(self.pt_root / path.relative_to(self.image_root).with_suffix(".pt"),
                                   weights_only=True)
        return self.normalize(image), self.classes[path.parent.name], coords, label_map


class OfficialStyleLoader:
    """Batches ``{"images", "targets"}`` like the trainer's loaders: the DataLoader's batches with
    their maps pooled on ``device`` (the dense scatter + ``roi_align`` of the official training loop).
    ``pt_root=None``: the same loader without ReLabel, one-hot targets of the folder classes."""

    def __init__(self, image_root: Path, pt_root: Path | None, *, batch_size: int, image_size: int = 224,
                 workers: int = 2, device: str = "cpu", num_classes: int = 1000):
        self.device, self.num_classes = torch.device(device), num_classes
        self.loader = torch.utils.data.DataLoader(
            OfficialStyleDataset(image_root, pt_root, image_size), batch_size=batch_size, shuffle=True,
            drop_last=True, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, coords, maps in self.loader:
            if maps.numel():
                maps = maps.to(self.device, non_blocking=True)
                targets = official_label_pooling(maps, coords.to(self.device, non_blocking=True), self.num_classes)
            else:
                targets = torch.nn.functional.one_hot(labels.to(self.device), self.num_classes).float()
            yield {"images": images.to(self.device, non_blocking=True), "targets": targets}
