"""`python -m service [options]` is `nextword serve [options]`."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
