"""relabel_dali: ReLabel (localized multi-label supervision) at DALI speed.

Folders by concern, imports one way (docs/ARCHITECTURE.md): ``store`` (label shards) <- ``ops``
(the LabelPool operator) <- ``data`` (listing, source, loaders) <- ``train`` (the trainer);
``annotate`` (the machine annotator) uses ``store`` and ``ops``. ``config``, ``progress`` and
``atomic`` at the root are shared ground. The data path: sample source -> DALI decode/crop (boxes out) -> LabelPool operator -> loader ->
train step. Public names are imported lazily so that importing the package stays cheap and an
optional part (DALI, the native operator) is only needed by the code that uses it.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LabelShardReader": "relabel_dali.store.reader",
    "LabelRecord": "relabel_dali.store.reader",
    "ShardCorruptError": "relabel_dali.store.reader",
    "LabelShardWriter": "relabel_dali.store.writer",
    "FormatError": "relabel_dali.store.format",
    "pool_labels": "relabel_dali.ops.pooling",
    "load_operators": "relabel_dali.ops.build",
    "SampleSource": "relabel_dali.data.source",
    "BadSampleError": "relabel_dali.data.listing",
    "list_images": "relabel_dali.data.listing",
    "DataSettings": "relabel_dali.data.settings",
    "Dataset": "relabel_dali.data.settings",
    "Labels": "relabel_dali.data.settings",
    "TrainAugment": "relabel_dali.data.settings",
    "ValTransform": "relabel_dali.data.settings",
    "Runtime": "relabel_dali.data.settings",
    "build_train_loader": "relabel_dali.data.loader",
    "build_val_loader": "relabel_dali.data.loader",
    "DaliLoader": "relabel_dali.data.loader",
    "cutmix_batch": "relabel_dali.train.cutmix",
    "soft_target_cross_entropy": "relabel_dali.train.losses",
    "load_config": "relabel_dali.config",
    "ConfigError": "relabel_dali.config",
    "build_annotator": "relabel_dali.annotate.annotator",
    "DenseClassifier": "relabel_dali.annotate.dense",
    "topk_maps": "relabel_dali.annotate.annotator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relabel_dali' has no attribute {name!r}")
    return getattr(import_module(module), name)
