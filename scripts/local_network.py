#!/usr/bin/env python3
"""Start, inspect and stop a local FI network: see ``fi_peer/localnet.py``."""

import sys

from fi_peer.localnet import main

if __name__ == "__main__":
    sys.exit(main())
