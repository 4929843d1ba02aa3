"""What every benchmark records next to its numbers: the machine, the other load on it, process-group memory."""
