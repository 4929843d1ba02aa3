"""Ingestion: validates, deduplicates and pseudonymizes shop events and catalog items."""
