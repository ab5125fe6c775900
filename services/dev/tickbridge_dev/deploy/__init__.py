"""Checks of the deployment files (compose, dashboards, alert rules) that only tests and CI run."""
