"""Dashboards as code: defined once (definitions.py), rendered to Grafana JSON and provisioning
(grafana.py, grafana-foundation-sdk) and to PNGs (monitoring.snapshot)."""
