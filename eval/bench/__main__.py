"""``python -m eval.bench``: see :mod:`eval.bench.run`."""

from eval.bench.run import main

raise SystemExit(main())
