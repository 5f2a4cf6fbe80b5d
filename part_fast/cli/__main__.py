"""`python -m part_fast.cli ...` is the `part-fast` command."""
import sys

from . import main

sys.exit(main())
