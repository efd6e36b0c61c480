"""`python -m quantsd.cli` runs the CLI (useful where the console script is not installed)."""

from . import main

main()
