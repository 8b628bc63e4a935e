"""``python -m gateway``: the same CLI as ``touchpoint-gateway``."""

import sys

from gateway.app.cli import main

sys.exit(main())
