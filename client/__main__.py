"""``python -m client``: the same as the fusion-client command."""

from client.cli import main

main()
