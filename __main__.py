"""`python -m privdiff` is the `privdiff` command."""

from .cli import main

raise SystemExit(main())
