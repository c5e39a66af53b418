"""The label store: the shard format (``format``), its reader and writer, and the per-image label
map files the shards are packed from (``labelmaps``). Imports nothing else of the package but the
shared root (``atomic``)."""
