"""`make demo` (`python -m cli.demo`) and `make demo-check` (`python -m cli.demo.check`): the end-to-end demo page."""
