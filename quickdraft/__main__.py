"""`python -m quickdraft ...` is the `quickdraft` command."""

import sys

from quickdraft.entrypoints.cli import main

sys.exit(main())
