"""`python -m mistral7b` runs the CLI."""

import sys

from mistral7b.cli import main

sys.exit(main())
