"""``python -m dreamood.demo``: the same as ``dreamood demo``."""

from dreamood.demo import main

raise SystemExit(main())
