"""`make audit`: pip-audit on the locked dependencies (requirements.lock), with an honest verdict.

pip-audit alone says "No known vulnerabilities found" and exits 0 when its service could not be asked: PyPI's
JSON API answering 404 only marks every package "skipped". This wrapper tells the three outcomes apart:

  exit 0  every locked package was checked and no vulnerability is known
  exit 1  a vulnerability is reported (one line each): the build fails
  exit 0  the audit could not run (no service answered for every package): one line says so and why;
  exit 2  the same when AUDIT_REQUIRED=1 (a CI that reaches the services sets it to make that fatal)

Services are tried in turn (PyPI's JSON API, then OSV); the first that answers for every package decides.
PIP_AUDIT overrides the pip-audit command (the tests use a stand-in).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SERVICES = ("pypi", "osv")
RUN_TIMEOUT_S = 240  # per service; pip-audit's own per-request timeout is 15 s


def _command() -> list[str]:
    return shlex.split(os.environ["PIP_AUDIT"]) if os.environ.get("PIP_AUDIT") else [sys.executable, "-m", "pip_audit"]


def _why(stderr: str) -> str:
    """The cause of a failed pip-audit run, in a few words (not its traceback)."""
    for pattern in (r"Failed to resolve '[^']+'", r"Failed to establish a new connection: [^\"')]+",
                    r"Read timed out", r"HTTP \d{3}[^\n]*"):
        found = re.search(pattern, stderr)
        if found:
            return found.group(0).strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:160]


def audit(lock: Path, service: str) -> tuple[list[dict], str]:
    """(dependencies as pip-audit reports them, "") or ([], why it did not run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        cmd = [*_command(), "--disable-pip", "-r", str(lock), "--vulnerability-service", service,
               "--format", "json", "--output", str(out), "--progress-spinner", "off"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [], f"no answer within {RUN_TIMEOUT_S} s"
        except OSError as e:
            return [], f"cannot start pip-audit: {e.strerror or e}"
        try:
            return json.loads(out.read_text())["dependencies"], ""
        except (OSError, ValueError, KeyError):
            return [], f"pip-audit exited {proc.returncode}: {_why(proc.stderr)}"


def main(argv: list[str]) -> int:
    lock = Path(argv[0] if argv else "requirements.lock")
    required = os.environ.get("AUDIT_REQUIRED") == "1"
    total = sum(1 for ln in lock.read_text().splitlines() if re.match(r"^[A-Za-z0-9][^\s]*==", ln))
    why = []
    for service in SERVICES:
        deps, failure = audit(lock, service)
        if failure:
            why.append(f"{service}: {failure}")
            continue
        vulnerable = [d for d in deps if d.get("vulns")]
        if vulnerable:
            for d in vulnerable:
                for v in d["vulns"]:
                    fix = ", ".join(v.get("fix_versions") or []) or "none yet"
                    aliases = f" ({', '.join(v['aliases'])})" if v.get("aliases") else ""
                    print(f"audit: VULNERABLE {d['name']} {d.get('version', '')}: {v.get('id')}{aliases}, "
                          f"fixed in {fix}")
            count = sum(len(d["vulns"]) for d in vulnerable)
            print(f"audit: FAILED: {count} known vulnerabilities in {len(vulnerable)} of {len(deps)} locked "
                  f"packages ({service}); upgrade them in requirements.lock (`make lock`)")
            return 1
        skipped = [d for d in deps if d.get("skip_reason")]
        if not skipped and len(deps) >= total:
            print(f"audit: {len(deps)} locked packages checked against {service}: no known vulnerabilities")
            return 0
        reason, _ = Counter(d["skip_reason"].split(": ")[0] for d in skipped).most_common(1)[0] if skipped else (
            f"only {len(deps)} of {total} packages reported", 0)
        why.append(f"{service}: {len(skipped)} of {len(deps)} packages not checked ({reason})")
    print(f"audit: COULD NOT RUN, the {total} locked packages were not checked: no vulnerability service answered "
          f"for them ({'; '.join(why)})" + ("" if required else "; not fatal without AUDIT_REQUIRED=1"))
    return 2 if required else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
