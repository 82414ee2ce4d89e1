"""``python -m step5.optimizer``: the Step 5 CLI (:func:`step5.optimizer.cli.main`), as the WATCHER starts it."""
from __future__ import annotations

import sys

from step5.optimizer.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m step5.optimizer"))
