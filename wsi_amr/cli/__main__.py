"""``python -m wsi_amr.cli``: the ``wsi-amr`` command."""

from wsi_amr.cli import main

main()
