"""The teacher's (input, edited) pairs: the sample format (``sample``), inputs (``inputs``), crash-safe
sharded generation (``settings``, ``shards``, ``generate``), ``p2pz shards inspect`` (``inspect``) and
the training reader (``reader``)."""
