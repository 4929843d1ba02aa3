"""Gateway: assembles recommendations for the storefront from Redis (and scoring on a miss)."""
