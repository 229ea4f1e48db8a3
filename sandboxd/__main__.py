"""``python -m sandboxd``: the same as the ``sandboxd`` command."""

from sandboxd.cli import main

main()
