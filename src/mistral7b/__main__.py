"""`python -m mistral7b` runs the CLI."""

import sys

from mistral7b.cli import main

if __name__ == "__main__":  # not when a spawned process (the server's API process) imports this module
    sys.exit(main())
