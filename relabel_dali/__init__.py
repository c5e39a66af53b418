"""relabel_dali: ReLabel (localized multi-label supervision) at DALI speed.

The data path: sample source -> DALI decode/crop (boxes out) -> LabelPool operator -> loader ->
train step. Public names are imported lazily so that importing the package stays cheap and an
optional part (DALI, the native operator) is only needed by the code that uses it.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LabelShardReader": "relabel_dali.reader",
    "LabelRecord": "relabel_dali.reader",
    "ShardCorruptError": "relabel_dali.reader",
    "LabelShardWriter": "relabel_dali.writer",
    "FormatError": "relabel_dali.format",
    "pool_labels": "relabel_dali.pooling",
    "load_operators": "relabel_dali.ops",
    "SampleSource": "relabel_dali.sources",
    "BadSampleError": "relabel_dali.sources",
    "build_train_loader": "relabel_dali.loader",
    "build_val_loader": "relabel_dali.loader",
    "DaliLoader": "relabel_dali.loader",
    "cutmix_batch": "relabel_dali.cutmix",
    "soft_target_cross_entropy": "relabel_dali.losses",
    "load_config": "relabel_dali.config",
    "build_annotator": "relabel_dali.annotator",
    "DenseClassifier": "relabel_dali.annotator",
    "topk_maps": "relabel_dali.annotator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relabel_dali' has no attribute {name!r}")
    return getattr(import_module(module), name)
