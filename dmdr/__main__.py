"""``python -m dmdr ...`` runs the CLI (used with ``torchrun -m dmdr train ...``)."""
from dmdr_cli.app import main

main()
