"""Code shared by at least two StyleRec services (config, logging, metrics, clients, bootstrap)."""
