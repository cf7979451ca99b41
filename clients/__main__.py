"""`python -m clients` is the same command line as `python -m clients.python_client`."""

from clients.cli import main

main(prog="python -m clients")
