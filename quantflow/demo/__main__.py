"""python -m quantflow.demo [DIR]: build the demo model and data (once)."""

import sys
from pathlib import Path


from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets

if __name__ == "__main__":
    build_demo_assets(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
