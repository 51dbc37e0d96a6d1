"""`python -m eventsync` is the same as the `eventsync` command."""

from eventsync.cli import main

raise SystemExit(main())
