"""What the benchmarks and the load test record next to their numbers: the machine, the other load on it,
process-group memory, percentiles."""
