"""The Dockerfile, checked without building it (there is no Docker engine here or in CI).

What an operator relies on: a slim final image without a compiler, a non-root user, the
`powercap` entry point, and every powercap program in it. The build context is simulated
from the Dockerfile's COPY lines and .dockerignore, so a file the wheel needs but the
context leaves out fails here rather than in `docker build`.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest

from tests.conftest import REPO_ROOT

# Packages that compile code; none may be installed in the final stage.
BUILD_TOOLS = re.compile(r"^(gcc|g\+\+|cpp|cc|clang|make|cmake|build-essential|binutils|libc6-dev|.*-dev)$")
# What the manifests run inside the powercap image besides `powercap`: exec probes
# (`python -c ...`) and the webhook's preStop hook (`sleep`). The python base image has both.
BASE_IMAGE_COMMANDS = {"python", "sleep"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args, stages


def expand(value: str, stage: Stage) -> str:
    """``${UID}:${UID}`` with the stage's ARG defaults substituted."""
    defaults = dict(arg.partition("=")[::2] for arg in stage.all("ARG"))
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins, `!` re-includes, a
    pattern that matches a directory excludes everything below it."""
    verdict = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def _glob_regex(glob: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((REPO_ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def context_files(dockerfile: tuple[dict[str, str], list[Stage]]) -> set[str]:
    """Files the build stage copies into /src: the COPY sources minus .dockerignore."""
    patterns = [
        line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = set()
    for stage in dockerfile[1]:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in shlex.split(copy)[:-1]:
                root = REPO_ROOT / source
                assert root.exists(), f"COPY {source}: not in the repository"
                for path in [root] if root.is_file() else root.rglob("*"):
                    relative = path.relative_to(REPO_ROOT).as_posix()
                    if (path.is_file() or path.is_symlink()) and not ignored(relative, patterns):
                        files.add(relative)
    return files


def test_final_image_is_slim_python_3_11(final: Stage) -> None:
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:\w+)?", final.base), final.base


def test_final_image_runs_as_a_non_root_user(final: Stage) -> None:
    [user] = final.all("USER")
    uid = expand(user, final).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric, so runAsNonRoot can verify it
    [useradd] = [run for run in final.all("RUN") if "useradd" in run]
    assert f"--uid \"{uid}\"" in expand(useradd, final) or f"--uid {uid}" in expand(useradd, final)


def test_final_image_has_no_compiler(final: Stage) -> None:
    installed = []
    for run in final.all("RUN"):
        for command in re.split(r"&&|;|\|\|", run):
            words = command.split()
            if words[:2] in (["apt-get", "install"], ["apt", "install"], ["apk", "add"]):
                installed += [w for w in words[2:] if not w.startswith("-")]
    assert not [p for p in installed if BUILD_TOOLS.match(p)]
    # only wheels built in the build stage are installed: pip never compiles here
    pip = [run for run in final.all("RUN") if "pip install" in run]
    assert pip and all("/wheels/" in run for run in pip)
    assert [c for c in final.all("COPY") if c.startswith("--from=")], "the final stage copies the built wheels"


def test_entry_point_is_the_powercap_command(final: Stage, pyproject: dict) -> None:
    [entrypoint] = final.all("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: signals reach powercap, not a shell
    assert argv == ["powercap"]
    assert "powercap" in pyproject["project"]["scripts"]


def test_build_context_holds_every_package_and_what_it_links_to(context_files: set[str], pyproject: dict) -> None:
    assert {"pyproject.toml", "README.md"} <= context_files
    for package in pyproject["tool"]["setuptools"]["packages"]:
        init = f"{package.replace('.', '/')}/__init__.py"
        data = [f for f in context_files if f.startswith(package.replace(".", "/") + "/")]
        assert init in context_files or data, f"package {package} is not in the image's build context"
    # powercap/data/crd.yaml links to config/crd/: the link target must be copied too
    for name in context_files:
        path = REPO_ROOT / name
        if path.is_symlink():
            target = path.resolve().relative_to(REPO_ROOT).as_posix()
            assert target in context_files, f"{name} -> {target}, which the build context leaves out"
    assert not [f for f in context_files if f.startswith(("tests/", ".venv/", ".git/")) or "__pycache__" in f]


def test_every_powercap_command_is_in_the_image(context_files: set[str], pyproject: dict) -> None:
    commands = pyproject["project"]["entry-points"]["powercap.commands"]
    assert {"webhook", "certs", "extender", "controller", "agent", "validate"} <= set(commands)
    for name, target in {**commands, **pyproject["project"]["scripts"]}.items():
        module_path = target.split(":")[0].replace(".", "/")
        assert {f"{module_path}.py", f"{module_path}/__init__.py"} & context_files, f"powercap {name}: {module_path} is not copied"


def test_base_image_provides_what_the_manifests_run_besides_powercap(final: Stage) -> None:
    from tests.manifests import kustomize_build, powercap_containers

    used = set()
    for _, container in powercap_containers(kustomize_build("config/default")):
        used |= {container.get("command", ["powercap"])[0]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in container.get(probe, {}):
                used.add(container[probe]["exec"]["command"][0])
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        if "exec" in pre_stop:
            used.add(pre_stop["exec"]["command"][0])
    assert used - {"powercap"} <= BASE_IMAGE_COMMANDS
    assert final.base.startswith("python:")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("docs/index.md", True, id="directory"),
        pytest.param(".venv/bin/python", True, id="virtualenv"),
        pytest.param(".git/config", True, id="git"),
        pytest.param("powercap/__pycache__/x.pyc", True, id="double-star"),
        pytest.param("nodeagent/libfake.so", True, id="extension"),
        pytest.param("powercap/cli.py", False, id="source"),
    ],
)
def test_dockerignore_keeps_local_files_out_of_the_image(path: str, expected: bool) -> None:
    patterns = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ignored(path, patterns) is expected

