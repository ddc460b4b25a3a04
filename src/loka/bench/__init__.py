"""Benchmark data built offline: CounterFact-style records from known facts (and, later, KG probes)."""
