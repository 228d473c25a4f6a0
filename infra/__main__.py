"""`python -m infra` runs the `imagegen` command line."""

from infra.cli import main

main()
