"""The deployment files are valid for the tools that read them: compose, systemd, supervisord."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML  # check-jsonschema's YAML reader
from supervisor.options import ServerOptions

from tests.support import ROOT

UNITS = ROOT / "deploy" / "systemd"
PROGRAMS = ("consume", "dispatch", "serve")


def test_compose_file_follows_the_compose_specification():
    tool = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec",
                           ROOT / "docker-compose.yml"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_starts_programs_after_healthy_services_and_migrations():
    services = YAML(typ="safe").load(ROOT / "docker-compose.yml")["services"]
    assert "15672:15672" in " ".join(services["rabbitmq"]["ports"])
    assert services["fake-twilio"]["profiles"] == ["sandbox"]
    for name in PROGRAMS:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert depends_on["rabbitmq"]["condition"] == "service_healthy"
        assert depends_on["postgres"]["condition"] == "service_healthy"
        assert services[name]["command"] == [name]
        assert "healthcheck" in services[name]


@pytest.fixture(scope="module")
def units_with_real_executable(tmp_path_factory) -> Path:
    """The units, with ExecStart pointing at this venv's smsq so verify can check it."""
    folder = tmp_path_factory.mktemp("units")
    smsq = Path(sys.executable).with_name("smsq")
    for unit in UNITS.glob("smsq*"):
        (folder / unit.name).write_text(unit.read_text().replace("/opt/smsq/bin/smsq", str(smsq)))
    return folder


def test_systemd_units_pass_systemd_analyze_verify(units_with_real_executable):
    # Never skipped: ./scripts/test.sh installs systemd-analyze where it is missing.
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run ./scripts/test.sh"
    names = [f"smsq-{p}.service" for p in PROGRAMS] + [
        "smsq-migrate.service", "smsq.target", "smsq-consume@1.service", "smsq-dispatch@2.service"]
    done = subprocess.run(["systemd-analyze", "verify", *names], cwd=units_with_real_executable,
                          capture_output=True, text=True)
    # verify exits 0 on directives it ignores, so any output at all is a defect too.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", [f"smsq-{p}.service" for p in PROGRAMS]
                         + ["smsq-consume@.service", "smsq-dispatch@.service"])
def test_systemd_units_run_sandboxed_and_stop_cleanly(unit):
    lines = set((UNITS / unit).read_text().splitlines())
    expected = {"EnvironmentFile=/etc/smsq/smsq.env", "Restart=on-failure", "NoNewPrivileges=yes",
                "ProtectSystem=strict", "DynamicUser=yes", "KillSignal=SIGTERM",
                "RestartPreventExitStatus=2"}
    assert expected <= lines
    assert any(line.startswith("TimeoutStopSec=") for line in lines)


def supervisor_options(conf: Path) -> ServerOptions:
    options = ServerOptions()
    options.realize(["-c", str(conf)])
    return options


def test_supervisord_conf_runs_every_program_from_this_checkout():
    options = supervisor_options(ROOT / "supervisord.conf")
    groups = {g.name: {p.name: p for p in g.process_configs} for g in options.process_group_configs}
    assert set(groups) == {*PROGRAMS, "sandbox"}
    assert set(groups["sandbox"]) == {"fake-twilio"}
    for group in groups.values():
        for name, program in group.items():
            assert f'{ROOT}/scripts/smsq" {name}' in program.command or (
                program.command == f"{ROOT}/scripts/smsq {name}")
            assert program.stopsignal == 15 and program.stopwaitsecs >= 10
            assert program.stdout_logfile == f"{ROOT}/run/log/{name}.log"
            assert program.exitcodes == [0, 2]
    assert options.logfile == f"{ROOT}/run/supervisord.log"
