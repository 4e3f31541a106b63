"""Ray job submission, cluster definitions and the end-to-end run."""
