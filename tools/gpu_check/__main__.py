"""``python -m tools.gpu_check [args]``: run the check (see tools.gpu_check.runner)."""
import sys

from tools.gpu_check.runner import main

sys.exit(main())
