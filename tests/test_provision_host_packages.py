"""The packages provisioning installs in a host's venv cover what the host's services import."""
import json
import re
import subprocess
import sys
from importlib import metadata

from provision.artifacts import APP_PACKAGES, HOST_PYTHON_PACKAGES

# What the services a host runs import: the multiplexer, the exporter, the alert webhook, backups.
HOST_ENTRY_MODULES = ("agents.service", "monitoring.exporter", "monitoring.webhook", "backup.__main__")
IMPORTED = f"""
import importlib, json, sys
before = set(sys.modules)
for name in {HOST_ENTRY_MODULES!r}:
    importlib.import_module(name)
print(json.dumps(sorted({{m.split(".")[0] for m in set(sys.modules) - before}})))
"""


def requirement_name(spec: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0].lower().replace("_", "-")


def closure(names) -> set[str]:
    """The distributions and everything they require (extras left out)."""
    seen, todo = set(), [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_every_package_a_hosts_services_import_is_installed_there():
    out = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True, check=True).stdout
    distributions = metadata.packages_distributions()
    installed = closure(HOST_PYTHON_PACKAGES)
    missing = set()
    for top in json.loads(out):
        if top in sys.stdlib_module_names or top in APP_PACKAGES or top.startswith("_"):
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
        if names and not names & installed:
            missing |= names
    assert not missing, f"add to provision.artifacts.HOST_PYTHON_PACKAGES: {sorted(missing)}"
