"""The federation's data: loading (parquet or Hub), partitioning into clients, splitting, image transforms."""
