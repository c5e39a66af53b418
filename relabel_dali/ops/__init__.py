"""The LabelPool operator: the native sources (``csrc/``), building and loading them (``build``), the
``pool_labels`` binding for torch tensors (``pooling``) and the literal Python reference with the
official formula (``reference``). Imports the store (for its limits), nothing above it."""
