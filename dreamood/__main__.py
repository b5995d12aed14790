"""``python -m dreamood`` runs the ``dreamood`` command; ``torchrun -m dreamood train ...`` runs it on N processes."""

import sys

from dreamood.cli import main

if __name__ == "__main__":
    sys.exit(main())
