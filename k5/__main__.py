"""`python -m k5 COMMAND ...` (and `torchrun -m k5 generate ...`): the same as the `k5` command."""

import sys

from k5.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
