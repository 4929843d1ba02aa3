"""Clients of a running stack: `stylerec ingest events|items`, `recommend`, `forget`, and the bulk-file readers."""
