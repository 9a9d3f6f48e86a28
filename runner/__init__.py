"""The runner: a process that keeps models warm and runs jobs on them (spec/RUNNER.md)."""
