"""`python -m pmdaemon ...` is the `pmdaemon` command."""
import sys

from pmdaemon.cli import main

sys.exit(main())
