"""``python -m bench``: the supervision benchmark (bench/supervision.py); run from the repository root."""
import sys

from .supervision import main

sys.exit(main())
