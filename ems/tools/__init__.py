"""Developer tools that ship with EMS (model builders for tests and benchmarks)."""
