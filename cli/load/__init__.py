"""`stylerec bench load`: the closed/open-loop load driver against the whole stack, the freshness probe beside
it, the state scoring holds by design and the memory report."""
