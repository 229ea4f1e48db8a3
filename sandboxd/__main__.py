"""``python -m sandboxd``: the same as the ``sandboxd`` command."""

from .cli import main

main()
