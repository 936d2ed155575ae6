"""Nox sessions: `tests` (pytest), `smoke` (pull, serve, one chat, stop; repro/run.sh), `lint` (ruff, hadolint).

Each session installs the locked environment from uv.lock into its own virtualenv."""


import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests", "smoke"]
DOCKERFILES = ("repro/docker/Dockerfile.cpu", "repro/docker/Dockerfile.cuda")


def install_locked(session: nox.Session, *groups: str) -> None:
    args = ["uv", "sync", "--frozen", "--inexact"]
    for group in groups:
        args += ["--group", group]
    session.run_install(*args, env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})


@nox.session
def tests(session: nox.Session) -> None:
    """The pytest suite, against the real llama-server and the embedded default model."""
    install_locked(session, "dev")
    session.run("invoke", "model.build-llamacpp")
    session.run("pytest", *(session.posargs or ["-ra"]), env={"PYTHONUNBUFFERED": "1"})


@nox.session
def smoke(session: nox.Session) -> None:
    """Reproducibility smoke test: pull the default model, serve it, one openai SDK chat, stop; then
    repro/run.sh: ten greedy answers whose hashes must equal the recorded reference's."""
    install_locked(session)
    session.run("python", "-m", "repro.smoke", *session.posargs)
    session.run("bash", "repro/run.sh", external=True, env={"VIRTUAL_ENV": session.virtualenv.location})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree; hadolint over repro/docker's Dockerfiles."""
    install_locked(session, "dev")
    session.run("ruff", "check", ".")
    session.run("hadolint", *DOCKERFILES)





@nox.session
def accuracy(session: nox.Session) -> None:
    """The kit against mbw, fio and llama-server's counters (apt-get install mbw fio first)."""
    install_locked(session)
    session.run("invoke", "model.build-llamacpp")
    session.run("invoke", "bench.accuracy", *session.posargs)
