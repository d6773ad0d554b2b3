"""The Kubernetes executor: one batch/v1 Job per run, followed by shared watch streams."""
