"""Offline evaluation: public data sets, the published protocols, ranking metrics, and the harness."""
