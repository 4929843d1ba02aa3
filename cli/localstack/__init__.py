"""The local stack: start, inspect and stop the embedded broker, stores and services (`stylerec up|status|down`)."""
