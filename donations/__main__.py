"""`python -m donations` runs the command line."""

from donations.cli import main

raise SystemExit(main())
