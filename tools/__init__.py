"""Command-line tools. Each runs as a script (``python tools/<name>.py``) and imports only the
``relabel_dali`` package; this file lets the tests import them as ``tools.<name>``."""
