"""The check's steps, sizes per device and form, time limits, the parity tolerance, and the
exceptions by which a step reports that it failed, was skipped or was interrupted."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ("environment", "build", "parity", "kernel", "data", "loader", "trainer", "tokens", "annotator")
NO_DALI_STEPS = ("environment", "build", "parity", "kernel")
TOLERANCE = 1e-6
IMAGENET_SIZES = ((400, 500), (330, 420))
TINY_SIZES = ((40, 56), (32, 48))

# Sizes per (device, quick). The full GPU check follows the targets' definitions (batches of 1024
# crops, >= 20k ImageNet-sized JPEGs, a few hundred ResNet-50 steps, ~2k annotated images); the CPU
# forms prove that every step runs, at sizes a laptop finishes in minutes (tests use the quick one).
PROFILES = {
    ("cuda", False): dict(parity_batch=1024, kernel_batch=1024, kernel_repeats=50, images=20480, val_images=512,
                          sizes=IMAGENET_SIZES, image_size=224, loader_batch=256, loader_rounds=2, train_batch=256,
                          train_epochs=3, arch="resnet50", annotate_images=2048, annotate_size=480,
                          annotate_batch=64),
    ("cuda", True): dict(parity_batch=1024, kernel_batch=1024, kernel_repeats=20, images=4096, val_images=256,
                         sizes=IMAGENET_SIZES, image_size=224, loader_batch=256, loader_rounds=1, train_batch=128,
                         train_epochs=2, arch="resnet50", annotate_images=512, annotate_size=480, annotate_batch=64),
    ("cpu", False): dict(parity_batch=1024, kernel_batch=256, kernel_repeats=5, images=256, val_images=32,
                         sizes=IMAGENET_SIZES, image_size=128, loader_batch=16, loader_rounds=1, train_batch=16,
                         train_epochs=2, arch="resnet18", annotate_images=64, annotate_size=224, annotate_batch=16),
    ("cpu", True): dict(parity_batch=128, kernel_batch=128, kernel_repeats=2, images=32, val_images=8,
                        sizes=TINY_SIZES, image_size=32, loader_batch=8, loader_rounds=1, train_batch=8,
                        train_epochs=2, arch="resnet18", annotate_images=16, annotate_size=64, annotate_batch=8),
}
# The token step (GPU only): a ViT-Tiny (patch 16) at the profile's image size, token labels on its
# patch grid, a few training steps.
TOKEN_ARCH = "timm:vit_tiny_patch16_224"
TOKEN_PATCH = 16
TOKEN_STEPS = 8
# Seconds per command of each step (a step may run several commands).
TIMEOUTS = {"environment": 120, "build": 600, "parity": 600, "kernel": 600, "data": 900, "loader": 900,
            "trainer": 900, "tokens": 600, "annotator": 600}
QUICK_TIMEOUTS = {"environment": 60, "build": 300, "parity": 240, "kernel": 180, "data": 180, "loader": 240,
                  "trainer": 240, "tokens": 240, "annotator": 180}


class StepFailure(Exception):
    """A step's checks failed: ``reason`` goes into the report, with whatever ``numbers`` were measured."""

    def __init__(self, reason: str, numbers: dict | None = None):
        super().__init__(reason)
        self.reason, self.numbers = reason, numbers or {}


class StepSkipped(Exception):
    """A step cannot run here: the message says why."""


class Interrupted(Exception):
    """SIGTERM or SIGINT (e.g. a time limit around the whole check): the running step's processes
    are killed, it is reported as failed, and the report is written before exiting."""
