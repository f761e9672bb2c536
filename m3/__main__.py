"""`python -m m3` runs the `m3` command."""

from m3.cli import main

raise SystemExit(main())
