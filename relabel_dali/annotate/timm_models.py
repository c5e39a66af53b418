"""timm classifiers as machine annotators (``--arch timm:NAME``).

Two forms, both applying the model's own classifier at every location of its last feature map:

* **Convolutional networks** (ResNet, EfficientNet, RegNet, Swin, ...): accepted only when the head
  is *global average pool -> (dropout) -> one linear layer*, which is checked on the model itself
  (its ``forward_head(pre_logits=True)`` must be the spatial mean of the features). The classifier
  then runs as a 1x1 convolution, bias included, and the dense map averaged over locations equals
  the model's own logits. Heads with anything non-linear after the pooling (ConvNeXt's LayerNorm,
  MLP heads, attention pooling, max pooling) have no exact dense form and are refused by name.
* **Vision transformers** (ViT, DeiT, EVA, ...): every patch token goes through the model's head
  as if it were the pooled token, and the tokens are laid out on their patch grid: the dense map
  of TokenLabeling-style annotators. ``exact`` says whether the map's mean is the model's logits:
  true for a mean-pooled head with every norm applied per token before pooling, false for
  class-token heads and for heads that normalize after pooling (``fc_norm``).

Input size, mean, std and interpolation come from the model's pretrained config; weights from a
local file (``weights=``) or timm's own cache/hub.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from relabel_dali.annotate.dense import DenseClassifier

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
_PROBE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def classifier_weights(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight [C, D]`` and ``bias [C]`` of the model's final classifier (Linear or 1x1 conv)."""
    classifier = model.get_classifier()
    if isinstance(classifier, nn.Linear):
        return classifier.weight, classifier.bias
    if isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.groups == 1:
        return classifier.weight.flatten(1), classifier.bias
    raise ValueError(f"timm:{name}: classifier {type(classifier).__name__} is not one linear layer "
                     "(nothing to apply per location)")


class TimmConvAdapter(DenseClassifier):
    """A timm convolutional classifier with an average-pool -> linear head, run fully convolutionally."""

    exact = True

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model.eval(), name
        self.channels_last_output = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        classifier_weights(model, name)
        self._check_head()

    def _to_model_layout(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 2, 3, 1) if self.channels_last_output else features

    @torch.no_grad()
    def _check_head(self) -> None:
        """The head must be the spatial mean followed by the classifier: probed on random features."""
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters())
        features = torch.randn(2, self.model.num_features, 3, 4, generator=generator).to(parameter)
        head = getattr(self.model, "head", None)
        head_name = f" ({type(head).__name__})" if isinstance(head, nn.Module) else ""
        refusal = (f"timm:{self.name} has no exact fully-convolutional form: its head{head_name} does more than "
                   "average-pool the features before one linear classifier (e.g. a norm, convolution or MLP "
                   "after the pooling, or max/attention pooling), so "
                   "the mean of a dense map would not be the model's logits. Exact: heads that are average "
                   "pooling, dropout and one linear layer (ResNet, EfficientNet, RegNet, Swin, ...)")
        try:
            pre_logits = self.model.forward_head(self._to_model_layout(features), pre_logits=True)
            logits = self.model.forward_head(self._to_model_layout(features))
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"{refusal}; its head rejects a [N, {self.model.num_features}, h, w] feature "
                             f"map: {str(error).splitlines()[0]}") from None
        mean = features.mean((2, 3))
        if pre_logits.shape != mean.shape or not torch.allclose(pre_logits, mean, **_PROBE_TOLERANCE):
            raise ValueError(refusal)
        weight, bias = classifier_weights(self.model, self.name)
        if not torch.allclose(logits, F.linear(mean, weight, bias), **_PROBE_TOLERANCE):
            raise ValueError(refusal)

    def features(self, x):
        features = self.model.forward_features(x)
        return features.permute(0, 3, 1, 2) if self.channels_last_output else features

    def head_weights(self):
        return classifier_weights(self.model, self.name)

    def global_logits(self, x):
        return self.model(x)


class TimmTokenAdapter(DenseClassifier):
    """A timm vision transformer: the head applied to each patch token, tokens on their grid.

    The per-token head is the model's own ``forward_head`` fed a sequence whose every token is that
    patch token: class-token, mean and max pooling all return the token itself, so the result is
    exactly ``head(fc_norm(token))`` (for DeiT's distilled models, the mean of both heads), and the
    model's own head code is reused rather than re-implemented.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model.eval(), name
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError(f"timm:{name} pools its tokens with attention (global_pool='map'): its head has "
                             "no per-token form")
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.exact = self._mean_equals_logits()

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = self.model.patch_embed
        if getattr(self.model, "dynamic_img_size", False):
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        return tuple(patch_embed.grid_size)

    def features(self, x):
        """Patch tokens ``[N, D, h, w]`` (prefix tokens dropped), row-major on the patch grid."""
        tokens = self.model.forward_features(x)
        height, width = self.grid(x.shape[2], x.shape[3])
        patches = tokens[:, self.num_prefix_tokens:]
        if tokens.ndim != 3 or patches.shape[1] != height * width:
            raise ValueError(f"timm:{self.name}: forward_features gave {tuple(tokens.shape)}, expected "
                             f"[N, {self.num_prefix_tokens} + {height}x{width}, D] tokens")
        return patches.transpose(1, 2).reshape(x.shape[0], -1, height, width)

    def head_per_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[M, D]`` tokens -> ``[M, C]``: the model's head on a sequence made of each token alone."""
        sequences = tokens[:, None, :].expand(-1, self.num_prefix_tokens + 1, -1)
        logits = self.model.forward_head(sequences)
        if logits.shape != (tokens.shape[0], self.num_classes):
            raise ValueError(f"timm:{self.name}: its head gave {tuple(logits.shape)} for {tokens.shape[0]} tokens; "
                             "expected one row of class logits per token (global_pool '' is not supported)")
        return logits

    def forward(self, x):
        features = self.features(x)
        n, dim, height, width = features.shape
        logits = self.head_per_token(features.permute(0, 2, 3, 1).reshape(-1, dim))
        return logits.reshape(n, height, width, -1).permute(0, 3, 1, 2)

    def global_logits(self, x):
        return self.model(x)

    @torch.no_grad()
    def _mean_equals_logits(self) -> bool:
        """Whether averaging the per-token logits gives the model's logits (probed on random tokens)."""
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters())
        tokens = torch.randn(2, self.num_prefix_tokens + 6, self.model.num_features, generator=generator).to(parameter)
        per_token = self.head_per_token(tokens[:, self.num_prefix_tokens:].reshape(-1, tokens.shape[2]))
        return bool(torch.allclose(per_token.reshape(2, 6, -1).mean(1), self.model.forward_head(tokens),
                                   **_PROBE_TOLERANCE))


def pretrained_config(name: str):
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(f"unknown timm model {name!r}" + (f"; closest: {', '.join(close)}" if close else ""))
    config = timm.models.get_pretrained_cfg(name)
    if config is None:
        raise ValueError(f"timm:{name}: no pretrained config (input size, normalization) is registered")
    return config


def default_input_size(name: str) -> int:
    """The square side the model's weights were made for (its pretrained config's input size)."""
    return int(pretrained_config(name).input_size[-1])


def create_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """The timm model with weights from ``weights`` (safetensors or a torch file; bare state dict or
    under ``state_dict``/``model``, EMA preferred, ``module.`` removed: timm's own loader) or, with
    none given, from timm's cache or the Hugging Face hub. The number of classes is the file's."""
    import timm

    config = pretrained_config(name)
    if weights is None:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # network, hub and cache errors come in many types
            reason = (str(error).splitlines() or [""])[0]
            raise RuntimeError(f"timm:{name}: could not get its pretrained weights from timm's cache or the "
                               f"Hugging Face hub ({type(error).__name__}: {reason}); download them where there "
                               "is network, or pass --weights FILE") from None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as error:
        raise ValueError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None
    classifiers = (config.classifier,) if isinstance(config.classifier, str) else tuple(config.classifier or ())
    num_classes = config.num_classes
    for classifier in classifiers:
        if f"{classifier}.weight" in state:
            num_classes = state[f"{classifier}.weight"].shape[0] - int(config.label_offset or 0)
            break
    overlay = dict(state_dict=state, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 **kwargs)
    except RuntimeError as error:
        raise ValueError(f"{path}: does not fit timm {name}: {str(error).splitlines()[0]}") from None


def build_timm_annotator(name: str, weights: str | Path | None = None, size: int | None = None) -> DenseClassifier:
    """``name`` without the ``timm:`` prefix; ``size`` fixes a vision transformer's input side."""
    config = pretrained_config(name)
    kwargs = {"img_size": size} if size is not None and config.fixed_input_size else {}
    model = create_model(name, weights, **kwargs)
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        adapter = TimmTokenAdapter(model, name)
    else:
        adapter = TimmConvAdapter(model, name)
    data_config = resolve_data_config(model)
    adapter.mean, adapter.std = tuple(data_config["mean"]), tuple(data_config["std"])
    adapter.interpolation = data_config["interpolation"]
    if adapter.interpolation not in INTERPOLATIONS:
        raise ValueError(f"timm:{name}: interpolation {adapter.interpolation!r} is not one of {INTERPOLATIONS}")
    return adapter.eval()


def resolve_data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config as resolve

    return resolve(model=model)
