"""The top layer: the ``p2pz`` command, one module per stage (``main`` builds the parser)."""
