"""Property-based tests (hypothesis) of every grader and answer parser: see below."""
