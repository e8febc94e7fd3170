"""``python -m fi_peer.explorer --rpc URL --contract ADDR`` (same as ``fi-peer explorer``)."""

import sys

from fi_peer.explorer.command import main

sys.exit(main())
