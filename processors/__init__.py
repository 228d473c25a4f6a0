"""Stream processors: the faust intake app that validates, dedupes and rate-limits."""
