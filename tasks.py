"""dgxready: `invoke --list` shows every collection; README.md explains the flow."""
from invoke import Collection, task

from agents import tasks as agents_tasks
from backup import tasks as backup_tasks
from bench import tasks as bench_tasks
from dgxready.cli import out, user_errors
from model import tasks as model_tasks
from model.quickstart import quickstart as run_quickstart
from monitoring import tasks as monitoring_tasks
from provision import tasks as provision_tasks
from repro import tasks as repro_tasks


@task(help={"port": "port for the temporary server"})
@user_errors
def quickstart(c, port=8089):
    """Pull the embedded default model, build llama.cpp, serve, answer one chat, stop."""
    run_quickstart(int(port), out)


ns = Collection()
ns.add_collection(model_tasks.ns)
ns.add_collection(bench_tasks.ns)
ns.add_collection(agents_tasks.ns)
ns.add_collection(provision_tasks.ns)
ns.add_collection(monitoring_tasks.ns)
ns.add_collection(backup_tasks.ns)
ns.add_task(quickstart)
ns.add_collection(repro_tasks.ns)
ns.add_task(repro_tasks.gate)
