"""`python -m feed.synthetic`: the same as `oddsgate feed`."""

import sys

from feed.synthetic.cli import main

sys.exit(main())
