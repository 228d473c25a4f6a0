"""`python -m imagegen` runs the `imagegen` command line."""

from imagegen.cli.app import main

main()
