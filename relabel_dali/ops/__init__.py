"""The LabelPool operator: the native sources (``csrc/``), building and loading them (``build``), the
``pool_labels`` binding for torch tensors (``pooling``), the literal Python reference with the
official formula (``reference``), token targets' reference (``token_reference``) and their compact
form (``compact``). Imports the store (for its limits), nothing above it."""
