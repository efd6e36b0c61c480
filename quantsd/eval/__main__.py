"""``python -m quantsd.eval ARGS`` == ``quantsd eval ARGS`` (for ``accelerate launch -m`` / ``torchrun -m``)."""

import sys

from quantsd.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]], prog_name="quantsd")
