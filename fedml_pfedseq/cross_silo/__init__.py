"""FedML cross-silo deployment: every simulator method as real FedML parties talking gRPC.

- ``fedml_runtime``: FedML made offline and quiet (no config fetch, files under the run, no busy-wait).
- ``aggregator`` / ``trainer``: FedML's ``ServerAggregator`` / ``ClientTrainer`` wrapping a method's server and
  client strategy objects, the same ones the simulator drives.
- ``party``: one party (``pfedseq party --cf recipe.yaml --rank R --role server|client``).
- ``launcher``: a whole deployment on one machine (``pfedseq deploy recipe.yaml``).
"""
