"""``python -m lmatlas.cli``: the same as the ``lmatlas`` command."""

from lmatlas.cli import main

raise SystemExit(main())
