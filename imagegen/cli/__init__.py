"""The `imagegen` command line (`imagegen.cli.app`), the composition root of the project."""
