"""Make the helper modules in tests/ (e.g. ``models``) importable."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
