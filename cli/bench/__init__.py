"""`stylerec bench <area>`: benchmarks of ingestion, scoring, the style worker and the gateway, and their summary."""
