"""`python -m part_fast ...` is the `part-fast` command."""
import sys

from .cli import main

sys.exit(main())
