"""`python -m wsi_mil.cli` runs the command line (used where the console script is not on PATH)."""

from wsi_mil.cli import main

main()
