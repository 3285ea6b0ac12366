"""`python -m kd.bench`: the training-step benchmark (kd/bench/bench.py)."""

from kd.bench.bench import main

raise SystemExit(main())
