"""alertmanager.yml, generated: every alert goes to the toolkit's webhook (monitoring/webhook.py),
grouped by alert name, resolved notices included."""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from monitoring.prometheus.rules import duration

RECEIVER = "dgxready-webhook"


@dataclass(frozen=True)
class RouteTiming:
    """Alertmanager's grouping delays; the defaults are Alertmanager's, tests shorten them."""
    group_wait_s: float = 30
    group_interval_s: float = 300
    repeat_interval_s: float = 4 * 3600


DEFAULT_TIMING = RouteTiming()


def alertmanager_config(webhook_url: str, timing: RouteTiming = DEFAULT_TIMING) -> dict:
    return {
        "route": {"receiver": RECEIVER, "group_by": ["alertname"],
                  "group_wait": duration(timing.group_wait_s),
                  "group_interval": duration(timing.group_interval_s),
                  "repeat_interval": duration(timing.repeat_interval_s)},
        "receivers": [{"name": RECEIVER, "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


def render_alertmanager_config(webhook_url: str, timing: RouteTiming = DEFAULT_TIMING) -> str:
    return yaml.safe_dump(alertmanager_config(webhook_url, timing), sort_keys=False)
