"""`python -m bench.lean orders|customers|payments`: one lean service, configured by env."""

import sys

from bench.handwritten import SERVICES
from bench.lean.services import main

if len(sys.argv) != 2 or sys.argv[1] not in SERVICES:
    sys.exit(f"usage: python -m bench.lean {{{','.join(SERVICES)}}}")
main(sys.argv[1])
