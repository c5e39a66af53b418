"""The machine annotator: classifiers run fully convolutionally (``dense`` for EfficientNet-Lite and
torchvision, ``timm_models`` for timm) and the label-space choice (``annotator``). Uses the store
and the operator's reference; the data path and the trainer do not import it."""
