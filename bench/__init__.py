"""oddsgate's benchmark: load generator, scenarios, peers, result tables and plots.

Run it with `python -m bench [--quick]` (or `make bench` / `make bench-quick`).
Nothing in the product imports this package.
"""
