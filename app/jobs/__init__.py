"""The job's life: submission, transitions, execution, recovery, the workers registry."""
