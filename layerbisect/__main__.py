"""`python -m layerbisect`: the command line, as `layerbisect`."""

import sys

from layerbisect.cli import main

sys.exit(main())
