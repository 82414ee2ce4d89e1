"""``python -m step5.optimizer``: the Step 5 CLI, as the WATCHER starts it.

The same :func:`step5.optimizer.cli.main` as the ``step5-optimize`` console script and the
``meta_prediction_optimizer_anti_overfit.py`` door.
"""
from __future__ import annotations

import sys

from step5.optimizer.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m step5.optimizer"))
