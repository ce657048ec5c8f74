"""`python -m cgctl` is the `cgctl` command."""

from cgctl.cli import main

main()
