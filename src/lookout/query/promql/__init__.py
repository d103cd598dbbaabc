"""PromQL over the store: promql-parser parses, engine.py evaluates with Prometheus 3
semantics, store.py reads series from DuckDB, promqltest.py runs Prometheus's test files.
docs/promql.md lists what is supported and every known difference from Prometheus."""
