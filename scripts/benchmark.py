"""Training and conversion speed of the DRDD networks: the same as ``drdd-med benchmark`` (see its ``--help``).

    python scripts/benchmark.py --quick --output bench.json
"""

import sys

from drdd_med.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
