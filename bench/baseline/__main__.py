"""`python -m bench.baseline orders|customers|payments`: one baseline service, configured by env."""

import sys

from bench.baseline.services import main
from bench.handwritten import SERVICES

if len(sys.argv) != 2 or sys.argv[1] not in SERVICES:
    sys.exit(f"usage: python -m bench.baseline {{{','.join(SERVICES)}}}")
main(sys.argv[1])
