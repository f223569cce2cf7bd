"""``python -m lightning_kd.cli``: the same as the ``lightning-kd`` command."""

from lightning_kd.cli import main

main()
