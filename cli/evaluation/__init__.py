"""Offline evaluation: `stylerec eval` (recommenders), `style-eval` (style transfer), `experiment` (λ choice)."""
