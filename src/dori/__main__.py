"""``python -m dori``: the same as the ``dori`` command."""

from dori.cli import main

raise SystemExit(main())
