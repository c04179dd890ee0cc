"""`python -m client classify DIR --out results.jsonl` (see client/cli.py)."""

from .cli import main

raise SystemExit(main())
