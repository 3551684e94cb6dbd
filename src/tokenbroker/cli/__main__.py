"""``python -m tokenbroker.cli``: the same as the ``tokenbroker`` command."""

from .main import main

main()
