"""DALI graph definitions: side-effect-free functions of their arguments."""
