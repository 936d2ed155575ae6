"""The build-on-host path of the llama.cpp step (used when the host's architecture differs from
the controller's). It compiles llama.cpp inside a test host (about 5 minutes on 2 cores), so it
runs only with DGXREADY_SLOW_TESTS=1."""
import os

import pytest
import yaml

from provision import lab
from provision.inventory import load_inventory, select
from provision.run import provision

pytestmark = pytest.mark.skipif(not os.environ.get("DGXREADY_SLOW_TESTS") or lab.available(),
                                reason="slow: set DGXREADY_SLOW_TESTS=1 (and run as root)")


@pytest.fixture
def builder(tmp_path):
    host = lab.make_host(tmp_path / "builder", "builder", "127.0.0.61")
    try:
        host.start()
        yield host
    finally:
        host.destroy()


def test_llamacpp_built_on_the_host_serves(tmp_path, isolated, builder):
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"hosts": {"builder": {
        "address": "127.0.0.61", "key": str(builder.key), "vars": {"llamacpp": "build", **lab.lab_vars()}}}}))
    record, _ = provision(select(load_inventory(inv), "builder"))
    by_step = {r.step: r for r in record.results}
    assert by_step["llama.cpp"].status == "changed" and "built on the host" in by_step["llama.cpp"].detail
    assert by_step["validate"].status == "ok"
    again, _ = provision(select(load_inventory(inv), "builder"), only="llama.cpp")
    assert again.results[0].status == "ok"
