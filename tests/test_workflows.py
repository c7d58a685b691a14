"""The GitHub workflow: valid against GitHub's schema (check-jsonschema) and clean under a workflow
linter (zizmor), its pull-request job made of the README's commands, and one repository URL."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]'")
    return path


def test_workflows_follow_the_schema():
    assert WORKFLOWS
    schema = ["--builtin-schema", "vendor.github-workflows"]
    out = subprocess.run([_tool("check-jsonschema"), *schema, *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflows_pass_the_linter():
    out = subprocess.run([_tool("zizmor"), "--offline", "--config", str(ROOT / ".github" / "zizmor.yml"),
                          *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _readme_commands() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return {line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
            for line in block.splitlines() if line.strip()}


def test_the_smoke_job_runs_the_readme_commands():
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())["jobs"]
    runs = [s["run"] for s in jobs["smoke"]["steps"] if "run" in s]
    assert runs and set(runs) <= _readme_commands(), (runs, _readme_commands())
    assert "make test" in runs
    assert any(s.get("run") == "make book" for s in jobs["build"]["steps"])


def test_book_and_readme_name_the_same_repository():
    url = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["repository"]["url"]
    readme = (ROOT / "README.md").read_text()
    assert url in readme
    owner, name = url.rstrip("/").split("/")[-2:]
    assert f"https://{owner}.github.io/{name}/" in readme  # where the published book lives
