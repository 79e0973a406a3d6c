"""``python -m deepimaging`` = the ``deepimaging`` command."""

import sys

from .cli import main

sys.exit(main())
