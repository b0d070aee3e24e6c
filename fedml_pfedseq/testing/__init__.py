"""Stand-ins for services a test or an offline machine lacks: ``hub_server.LocalHubServer``, a local endpoint that
speaks the parts of the Hugging Face Hub's HTTP API that ``huggingface_hub`` uses (``pfedseq hub-serve``)."""
