"""`python -m part_fast.check [...]` is `part-fast check [...]` (the arguments are parsed by part_fast.cli)."""
import sys

from ..cli import main

sys.exit(main(["check", *sys.argv[1:]]))
