"""``python -m metrix ...`` runs the command line (as torchrun and other launchers need)."""

from metrix.cli import main

main()
