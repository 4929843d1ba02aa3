"""`stylerec bench load`: the closed/open-loop load driver against the whole stack, its state and memory report."""
