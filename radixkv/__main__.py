"""`python -m radixkv`: the `radixkv` command (see `radixkv.cli`)."""

import sys

from .cli import main

sys.exit(main())
