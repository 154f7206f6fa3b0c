"""The dmdr command-line interface (installed as the ``dmdr_cli`` package; the folder is ``cli/``)."""
