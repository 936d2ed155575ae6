"""The dashboards as Grafana JSON (built with grafana-foundation-sdk, Grafana 11.6's schema) and the
provisioning files for /etc/grafana/provisioning: datasources (Prometheus, Loki) and a file provider
whose options.path holds the dashboards. `write_grafana()` writes them under monitoring/grafana/,
where they are committed; a test checks that the committed files are what this module generates."""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import logs, loki, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueGraphMode, GraphThresholdsStyleMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

from dgxready.files import atomic_write_text
from monitoring.dashboards.definitions import DASHBOARDS
from monitoring.dashboards.model import Dashboard, Panel

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "grafana"
HOST_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/dgxready"
FOLDER = "dgxready"


@dataclass(frozen=True)
class Datasources:
    """Where Grafana finds them on the host: Prometheus and Loki on their usual local ports."""
    prometheus_url: str = "http://127.0.0.1:9090"
    loki_url: str = "http://127.0.0.1:3100"


def datasource_ref(panel: Panel) -> DataSourceRef:
    return DataSourceRef(type_val=panel.datasource, uid=panel.datasource)


def targets(panel: Panel) -> list:
    refs = string.ascii_uppercase
    if panel.datasource == "loki":
        return [loki.Dataquery().expr(q.expr).ref_id(refs[i]) for i, q in enumerate(panel.queries)]
    return [prometheus.Dataquery().expr(q.expr).legend_format(q.legend or "__auto").ref_id(refs[i])
            for i, q in enumerate(panel.queries)]


def red_line(at: float) -> gd.ThresholdsConfig:
    return gd.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(color="green", value=None), Threshold(color="red", value=at)])


def visual(panel: Panel):
    if panel.kind == "logs":
        return logs.Panel().show_time(True).wrap_log_message(True)
    if panel.kind == "stat":
        return stat.Panel().unit(panel.unit).graph_mode(BigValueGraphMode.AREA)
    built = timeseries.Panel().unit(panel.unit).fill_opacity(10)
    if panel.line is not None:
        built = built.thresholds(red_line(panel.line)).thresholds_style(
            GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED))
    return built


def grafana_panel(panel: Panel, panel_id: int):
    return (visual(panel).id(panel_id).title(panel.title).description(panel.description)
            .datasource(datasource_ref(panel)).targets(targets(panel)).span(panel.width).height(panel.height))


def grafana_dashboard(d: Dashboard) -> dict:
    built = (gd.Dashboard(d.title).uid(d.uid).description(d.description).tags(["dgxready"])
             .refresh("30s").time("now-1h", "now").timezone("browser").editable())
    panel_id = 1
    for row in d.rows:
        built = built.with_row(gd.Row(row.title).id(panel_id))
        panel_id += 1
        for panel in row.panels:
            built = built.with_panel(grafana_panel(panel, panel_id))
            panel_id += 1
    return json.loads(json.dumps(built.build(), cls=JSONEncoder))


def datasources_yaml(ds: Datasources) -> str:
    doc = {"apiVersion": 1, "datasources": [
        {"name": "Prometheus", "type": "prometheus", "uid": "prometheus", "access": "proxy",
         "url": ds.prometheus_url, "isDefault": True, "editable": False},
        {"name": "Loki", "type": "loki", "uid": "loki", "access": "proxy", "url": ds.loki_url,
         "editable": False},
    ]}
    return yaml.safe_dump(doc, sort_keys=False)


def dashboards_provider_yaml(path: str = HOST_DASHBOARDS_PATH) -> str:
    doc = {"apiVersion": 1, "providers": [
        {"name": "dgxready", "orgId": 1, "folder": FOLDER, "type": "file", "disableDeletion": True,
         "allowUiUpdates": False, "updateIntervalSeconds": 60, "options": {"path": path}},
    ]}
    return yaml.safe_dump(doc, sort_keys=False)


def generated_files(ds: Datasources = Datasources(),
                    dashboards: tuple[Dashboard, ...] = DASHBOARDS) -> dict[str, str]:
    """Relative path under monitoring/grafana/ -> text. provisioning/ goes to /etc/grafana/provisioning,
    dashboards/ to the provider's options.path."""
    files = {"provisioning/datasources/dgxready.yaml": datasources_yaml(ds),
             "provisioning/dashboards/dgxready.yaml": dashboards_provider_yaml()}
    for d in dashboards:
        files[f"dashboards/{d.uid}.json"] = json.dumps(grafana_dashboard(d), indent=2, sort_keys=True) + "\n"
    return files


def write_grafana(out_dir: Path = GRAFANA_DIR, ds: Datasources = Datasources()) -> list[Path]:
    written = []
    for rel, text in generated_files(ds).items():
        path = out_dir / rel
        atomic_write_text(path, text)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_grafana():
        print(p)
