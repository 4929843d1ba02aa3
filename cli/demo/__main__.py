"""`python -m cli.demo` (`make demo`): runs the demo in cli/demo/run.py."""

import sys

from cli.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
