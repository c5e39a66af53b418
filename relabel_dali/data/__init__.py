"""The data path: the dataset listing, the epoch order, the sample source and its workers, the
per-sample augmentation draws, the typed data settings, the loaders, and checks of encoded images.
Imports the store and the operator, never the trainer."""
