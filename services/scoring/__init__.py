"""Scoring: collaborative filtering over the event stream; writes per-user top-N to Redis."""
