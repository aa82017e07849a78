"""The dependency lock and its audit: requirements.lock pins every runtime dependency with hashes, the images
and the test venv install from it, CI runs `make audit` and then the README's `make test`, and .ci/audit.py
fails on a reported vulnerability and never passes silently when no vulnerability service answered (checked
with a stand-in for pip-audit: the real services are out of this machine's reach)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes)."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            pins[current] = (pins[current][0], pins[current][1] + 1)
    return pins


def test_lock_pins_every_runtime_dependency_with_hashes():
    pins = _lock()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep} is not in requirements.lock: run `make lock`"
        assert dep.specifier.contains(pins[name][0]), f"requirements.lock pins {name}=={pins[name][0]}, not {dep}"
    assert all(n_hashes for _, n_hashes in pins.values()), "every pin carries its hashes (--require-hashes)"


@pytest.mark.parametrize("role", ("collector", "storage-hot", "storage-cold"))
def test_images_build_from_the_lock(role):
    text = (ROOT / role / "Dockerfile").read_text()
    assert "RUN pip wheel --wheel-dir /wheels --require-hashes -r requirements.lock \\\n" \
           "    && pip wheel --wheel-dir /wheels --no-deps .\n" in text
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text().splitlines()


def test_ci_runs_the_audit_then_the_readme_test_command():
    commands = [ln.split("#")[0].strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-2:] == ["make audit", "make test"], commands
    assert "make test    # the whole test suite" in (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert ("\naudit: $(STAMP)\n\t$(BIN)/pip install -q -e '.[audit]'\n"
            "\t$(BIN)/python .ci/audit.py requirements.lock\n") in makefile
    assert "\n\t$(BIN)/pip install -q -r requirements.lock\n\t$(BIN)/pip install -q -e '.[embedded,test]'\n" in makefile


FAKE = '''
import json, sys
from pathlib import Path
args = sys.argv[1:]
service = args[args.index("--vulnerability-service") + 1]
plan = json.loads(Path(sys.argv[0]).with_name("plan.json").read_text())
with open(Path(sys.argv[0]).with_name("calls.txt"), "a") as f:
    f.write(service + "\\n")
answer = plan[service]
if isinstance(answer, str):  # pip-audit died, e.g. the service's host does not resolve
    sys.stderr.write("Traceback (most recent call last):\\n  ...\\n" + answer + "\\n")
    sys.exit(1)
Path(args[args.index("--output") + 1]).write_text(json.dumps({"dependencies": answer, "fixes": []}))
sys.exit(1 if any(d.get("vulns") for d in answer) else 0)
'''
CLEAN = [{"name": "aiohttp", "version": "3.9.0", "vulns": []}, {"name": "yarl", "version": "1.9.4", "vulns": []}]
SKIPPED = [{"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n} (1.0)"}
           for n in ("aiohttp", "yarl")]
VULN = {"id": "PYSEC-2024-24", "fix_versions": ["3.9.2"], "aliases": ["CVE-2024-23334"], "description": "..."}
OSV_DOWN = ("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='api.osv.dev', port=443): (Caused by "
            "NameResolutionError(\"...: Failed to resolve 'api.osv.dev' ([Errno -2] Name or service not known)\"))")


def _audit(tmp_path: Path, plan: dict, required: bool = False) -> tuple[int, list[str], list[str]]:
    (tmp_path / "fake_pip_audit.py").write_text(FAKE)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    lock = tmp_path / "requirements.lock"
    lock.write_text("aiohttp==3.9.0 \\\n    --hash=sha256:00\nyarl==1.9.4 \\\n    --hash=sha256:11\n")
    env = {"PATH": "/usr/bin:/bin", "PIP_AUDIT": shlex.join([sys.executable, str(tmp_path / "fake_pip_audit.py")]),
           **({"AUDIT_REQUIRED": "1"} if required else {})}
    proc = subprocess.run([sys.executable, str(ROOT / ".ci/audit.py"), str(lock)], env=env, capture_output=True,
                          text=True, timeout=60)
    calls = (tmp_path / "calls.txt").read_text().split() if (tmp_path / "calls.txt").exists() else []
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout.splitlines(), calls


def test_audit_fails_on_a_reported_vulnerability(tmp_path):
    code, lines, calls = _audit(tmp_path, {"pypi": [{**CLEAN[0], "vulns": [VULN]}, CLEAN[1]], "osv": CLEAN})
    assert code == 1
    assert lines == ["audit: VULNERABLE aiohttp 3.9.0: PYSEC-2024-24 (CVE-2024-23334), fixed in 3.9.2",
                     "audit: FAILED: 1 known vulnerabilities in 1 of 2 locked packages (pypi); upgrade them in "
                     "requirements.lock (`make lock`)"], lines
    assert calls == ["pypi"]


def test_audit_passes_only_when_every_package_was_checked(tmp_path):
    code, lines, calls = _audit(tmp_path, {"pypi": CLEAN, "osv": OSV_DOWN})
    assert (code, lines, calls) == (0, ["audit: 2 locked packages checked against pypi: no known vulnerabilities"],
                                    ["pypi"])


def test_audit_falls_back_to_osv_when_pypi_skips_packages(tmp_path):
    (tmp_path / "a").mkdir()
    code, lines, calls = _audit(tmp_path / "a", {"pypi": SKIPPED, "osv": CLEAN})
    assert (code, lines, calls) == (0, ["audit: 2 locked packages checked against osv: no known vulnerabilities"],
                                    ["pypi", "osv"])
    (tmp_path / "b").mkdir()
    partly = {"pypi": [SKIPPED[0], CLEAN[1]], "osv": [CLEAN[0], {**CLEAN[1], "vulns": [VULN]}]}
    code, lines, _ = _audit(tmp_path / "b", partly)
    assert code == 1 and lines[0].startswith("audit: VULNERABLE yarl 1.9.4: PYSEC-2024-24"), lines


def test_audit_that_could_not_run_says_so_in_one_line(tmp_path):
    """What happens on this machine: PyPI's JSON API answers 404 (every package skipped), OSV does not resolve."""
    plan = {"pypi": SKIPPED, "osv": OSV_DOWN}
    for required, expected_code in ((False, 0), (True, 2)):
        where = tmp_path / str(required)
        where.mkdir()
        code, lines, calls = _audit(where, plan, required)
        assert code == expected_code and calls == ["pypi", "osv"] and len(lines) == 1, (code, lines)
        assert lines[0].startswith("audit: COULD NOT RUN, the 2 locked packages were not checked: no vulnerability "
                                   "service answered for them (pypi: 2 of 2 packages not checked (Dependency not "
                                   "found on PyPI and could not be audited); osv: pip-audit exited 1: Failed to "
                                   "resolve 'api.osv.dev')"), lines[0]
        assert lines[0].endswith("not fatal without AUDIT_REQUIRED=1") != required, lines[0]
