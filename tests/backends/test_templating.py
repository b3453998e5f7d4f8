"""Submission-script rendering: hostile task values, the allow-list, the documented variables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from funnel_hpc.backends import templating
from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.backends.templating import (
    TemplateValueError,
    check_backend_parameters,
    directive,
    map_backend_parameters,
    render,
    script_variables,
    shell_quote,
)
from funnel_hpc.core.config import TEMPLATES_DIR
from tests.backend_helpers import NO_WORK_DIR, backend_options, make_request
from tests.templating_helpers import HOSTILE, HOSTILE_ARGS, task


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.lstrip().startswith("#SBATCH")]


def bash_syntax_ok(script: str, tmp_path: Path) -> bool:
    path = tmp_path / "syntax.sh"
    path.write_text(script)
    return subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_hostile_task_values_change_no_directive(tmp_path):
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    params = {"qos": "normal", "time": "01:00:00"}
    good = backend.render_script(make_request(tmp_path, task("ok", "benign"), params=params))
    bad = backend.render_script(make_request(
        tmp_path, task(HOSTILE, HOSTILE), ["/bin/echo", *HOSTILE_ARGS],
        params={**params, HOSTILE: HOSTILE, "#sbatch --x": "y"}))  # unknown keys: left out
    assert directives(good) == directives(bad)
    assert "#SBATCH --qos=normal" in directives(bad)
    assert bash_syntax_ok(good, tmp_path) and bash_syntax_ok(bad, tmp_path)
    # nothing but the directive block, set -eo and exec: no line the task added
    body = [line for line in bad.splitlines() if line and not line.startswith("#")]
    assert body == ["set -eo pipefail", body[-1]] and body[-1].startswith("exec ")
    assert "\x00" not in bad and "\r" not in bad


def test_worker_arguments_arrive_verbatim(tmp_path):
    """Run the whole rendered script with bash (directives are comments there)."""
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    printer = "import json, sys; print(json.dumps(sys.argv[1:]))"
    args = [a.replace("\x00", "") for a in HOSTILE_ARGS]  # argv cannot hold NUL anyway
    request = make_request(tmp_path, task(HOSTILE, HOSTILE), [sys.executable, "-c", printer, *args])
    script = tmp_path / "run.sh"
    script.write_text(backend.render_script(request))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == args
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("value", ["1\n#SBATCH --wrap=x", "$(id)", "a b", "`id`", "x;y", "'q'",
                                   "a\rb", "a\x00b", "\"", "x\ty", "a|b", "é"])
def test_backend_parameter_values_that_cannot_be_safe_are_refused(tmp_path, value):
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    request = make_request(tmp_path, {"id": "t1"}, params={"qos": value})
    with pytest.raises(TemplateValueError, match="not allowed in a scheduler directive"):
        backend.render_script(request)
    with pytest.raises(BackendError, match="not allowed in a scheduler directive"):
        backend.submit(request)
    assert not (tmp_path / "t1" / "slurm.sh").exists()
    with pytest.raises(ValueError, match="backend_parameters\\['qos'\\]"):
        check_backend_parameters({"qos": value}, {"qos": "--qos"}, strict=False)


@pytest.mark.parametrize("zone", ["debug\n#SBATCH --x", "a b", "$(id)"])
def test_hostile_zone_is_refused(tmp_path, zone):
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    with pytest.raises(TemplateValueError):
        backend.render_script(make_request(tmp_path, {"id": "z", "resources": {"zones": [zone]}}))


def test_allowed_backend_parameters_become_directives(tmp_path):
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    script = backend.render_script(make_request(
        tmp_path, {"id": "t2", "resources": {"zones": ["debug"], "ram_gb": 2, "disk_gb": 1,
                                             "cpu_cores": 3}},
        params={"qos": "high", "time": "01:00:00", "gres": "gpu:a100:2", "exclusive": "",
                "nodelist": "node[01-04]", "notlisted": "x"}))
    lines = directives(script)
    for expected in ("--qos=high", "--time=01:00:00", "--gres=gpu:a100:2", "--exclusive",
                     "--nodelist=node[01-04]", "--partition=debug", "--mem=2048M", "--tmp=1024M",
                     "--cpus-per-task=3", "--job-name=funnel-t2"):
        assert f"#SBATCH {expected}" in lines
    assert not any("notlisted" in line for line in lines)


def test_partition_from_config_and_site_extras(tmp_path):
    site = {"account": "proj1", "qos": "normal", "extra_directives": ["--requeue"],
            "modules": ["gcc/12"], "prologue": ["ulimit -c 0"]}
    backend = SlurmBackend(backend_options("slurm", partition="batch", site=site), NO_WORK_DIR)
    script = backend.render_script(make_request(tmp_path, {"id": "t3"}))
    lines = directives(script)
    assert "#SBATCH --partition=batch" in lines and "#SBATCH --account=proj1" in lines
    assert "#SBATCH --qos=normal" in lines and "#SBATCH --requeue" in lines
    assert "module load gcc/12\n" in script and "\nulimit -c 0\n" in script


def test_bad_option_name_in_config_is_refused():
    with pytest.raises(TemplateValueError, match="not an option name"):
        map_backend_parameters({"qos": "x"}, {"qos": "--qos=x\n#SBATCH --y"})


def test_check_backend_parameters():
    allowed = {"qos": "--qos", "Time": "--time"}
    accepted, warnings = check_backend_parameters({"QOS": "high", "time": "1:00", "bogus": "1",
                                                   "other": "2"}, allowed, strict=False)
    assert accepted == {"qos": "high", "time": "1:00"}
    assert warnings == ["backend_parameters ignored: bogus, other"]
    assert check_backend_parameters({"qos": "x"}, allowed, strict=True) == ({"qos": "x"}, [])
    with pytest.raises(ValueError, match="unsupported backend_parameters: bogus, other"):
        check_backend_parameters({"qos": "x", "bogus": "1", "other": "2"}, allowed, strict=True)


def test_filters():
    assert directive("gpu:2") == "gpu:2"
    for bad in ("a\nb", "a\rb", "a\x00b", "a b", "a#b"):
        with pytest.raises(TemplateValueError):
            directive(bad)
    assert shell_quote("a b") == "'a b'"
    assert shell_quote("a\nb'c") == "$'a\\x0ab\\x27c'"
    assert "\n" not in shell_quote(HOSTILE)


def test_strict_undefined_and_site_template(tmp_path):
    own = tmp_path / "site.sh.j2"
    own.write_text("#!/bin/bash\n#SBATCH -J {{ job_name | directive_value }}\n"
                   "exec {{ worker_command }}\n")
    backend = SlurmBackend(backend_options("slurm", template=str(own)), NO_WORK_DIR)
    script = backend.render_script(make_request(tmp_path, {"id": "t4"}, ["/bin/echo", "a b"]))
    assert script == "#!/bin/bash\n#SBATCH -J funnel-t4\nexec /bin/echo 'a b'\n"
    own.write_text("{{ no_such_variable }}")
    with pytest.raises(BackendError, match="no_such_variable"):
        backend.submit(make_request(tmp_path, {"id": "t5"}))
    with pytest.raises(TemplateValueError, match="not found"):
        render(str(tmp_path / "missing.j2"), {})


def test_every_variable_is_documented(tmp_path):
    variables = script_variables(make_request(tmp_path, {"id": "t6"}), backend_options("slurm"))
    header = (TEMPLATES_DIR / "slurm.sh.j2").read_text().split("#}")[0]
    for name in variables:
        assert name in header, f"{name} missing from the template's comment block"
        assert f"``{name}``" in templating.__doc__, f"{name} missing from the module docstring"


def test_a_trailing_newline_is_not_a_safe_directive():
    # Python's `$` accepts a trailing newline: the checks use re.fullmatch
    for value in ("x\n", "normal\n"):
        with pytest.raises(TemplateValueError):
            directive(value)
    with pytest.raises(TemplateValueError, match="not an option name"):
        map_backend_parameters({"qos": "x"}, {"qos": "--qos\n"})
