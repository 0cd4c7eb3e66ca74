"""The Docker deployment, checked without a Docker engine.

docker-compose.yml, headnode/Dockerfile, computenode/Dockerfile, their
entrypoint scripts and .dockerignore are read as text (YAML for the compose
file) and held against the code: services and images, commands that exist,
environment names that are real settings, mounts whose host folders exist or
are made by `make`. The two entrypoint scripts are also run, with stand-ins
for Docker's DNS, to check how a compute node names itself.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cm.config import documented

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = {"headnode": REPO / "headnode" / "Dockerfile", "computenode": REPO / "computenode" / "Dockerfile"}
NODE_SERVICES = {"computenode-gpu": "gpu", "computenode-cpu": "cpu"}
CM_SERVICES = ["headnode", *NODE_SERVICES]
SETTINGS = {name for name, _, _ in documented()}
DEFAULTS = {name: str(default) for name, default, _ in documented()}


# --- readers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of every volume of a service."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((str(vol.get("source", "")), str(vol["target"])))
        else:
            source, target = str(vol).split(":")[:2]
            out.append((source, target))
    return out


def bind_sources(service: dict) -> list[str]:
    return [s for s, _ in mounts(service) if s.startswith((".", "/"))]


def mount_source(service: dict, target: str) -> str | None:
    return next((s for s, t in mounts(service) if t == target), None)


def relpath(source: str) -> str:
    return os.path.normpath(source).removeprefix("./")


def argv(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(str(value))


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return [str(a) for a in yaml.safe_load(args)] if args.startswith("[") else ["/bin/sh", "-c", args]


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    out = []
    for word, args in dockerfile(path):
        if word not in ("COPY", "ADD"):
            continue
        parts = exec_form(args) if args.startswith("[") else shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        out.append((parts[:-1], parts[-1]))
    return out


def image_env(path: Path) -> dict[str, str]:
    env = {}
    for word, args in dockerfile(path):
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def last(path: Path, instruction: str) -> list[str]:
    found = [args for word, args in dockerfile(path) if word == instruction]
    return exec_form(found[-1]) if found else []


def dockerfile_of(service: dict) -> Path:
    build = service["build"]
    context = REPO / build.get("context", ".") if isinstance(build, dict) else REPO / build
    return context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")


def dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context."""
    parts = path.strip("/").split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _glob_regex(os.path.normpath(pattern.lstrip("!").strip("/")))
        if any(rx.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


def makefile_default_recipe() -> list[str]:
    """Recipe lines of the Makefile's default target and of every target it depends on."""
    path = REPO / "Makefile"
    assert path.exists(), "there is no Makefile: `make` must launch the Docker cluster"
    text = re.sub(r"\\\n", " ", path.read_text())
    variables: dict[str, str] = {}
    rules: dict[str, tuple[list[str], list[str]]] = {}
    default, current = None, []
    for line in text.splitlines():
        if line.startswith("\t"):
            for target in current:
                rules[target][1].append(line.strip())
            continue
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        current = []
        assign = re.match(r"^(?:export\s+|override\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:::=|:=|\?=|\+=|!=|=)\s*(.*)$", line)
        if assign:
            variables[assign[1]] = assign[2]
            continue
        rule = re.match(r"^([^:=\s][^:=]*?)\s*::?(?!=)\s*([^;]*)(?:;\s*(.*))?$", line)
        if rule and not rule[1].startswith(("ifeq", "ifneq", "ifdef", "ifndef", "include", "-include")):
            targets = rule[1].split()
            for target in targets:
                rules.setdefault(target, ([], []))
                rules[target][0].extend(rule[2].split())
                if rule[3]:
                    rules[target][1].append(rule[3])
            if default is None and not targets[0].startswith("."):
                default = targets[0]
            current = targets
    assert default, "the Makefile has no default target"

    def expand(s: str) -> str:
        for _ in range(5):
            s = re.sub(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", lambda m: variables.get(m[1], m[0]), s)
        return s

    seen, todo, lines = set(), [default], []
    while todo:
        target = todo.pop()
        if target in seen or target not in rules:
            continue
        seen.add(target)
        prereqs, recipe = rules[target]
        todo.extend(expand(" ".join(prereqs)).split())
        lines.extend(expand(line) for line in recipe)
    return lines


def made_by_make() -> set[str]:
    """Folders `mkdir` creates in the default target's recipe, relative to the repository root."""
    made = set()
    for line in makefile_default_recipe():
        for cmd in re.split(r"&&|\|\||;|\|", line):
            words = cmd.strip().lstrip("@-+").split()
            if words and words[0] == "mkdir":
                made.update(relpath(w.replace("$(CURDIR)/", "").replace("${CURDIR}/", ""))
                            for w in words[1:] if not w.startswith("-"))
    return made


def entrypoint_scripts() -> list[Path]:
    return [p for p in (REPO / "headnode" / "entrypoint.sh", REPO / "computenode" / "entrypoint.sh") if p.exists()]


# --- services ---------------------------------------------------------------------


def test_the_compose_file_has_mongo_the_head_and_one_compute_service_per_partition(services):
    assert {"mongo", "headnode", "computenode-gpu", "computenode-cpu"} <= set(services)


def test_mongo_is_mongo_7_keeping_its_data_under_drive_db(services):
    mongo = services["mongo"]
    assert mongo["image"] == "mongo:7"
    source = mount_source(mongo, "/data/db")
    assert source is not None, "mongo must mount its data dir /data/db"
    assert relpath(source) == "drive/db" or relpath(source).startswith("drive/db/")


def test_mongo_has_a_healthcheck_and_the_head_waits_for_it(services):
    assert services["mongo"].get("healthcheck", {}).get("test"), "mongo needs a healthcheck"
    depends = services["headnode"]["depends_on"]
    assert isinstance(depends, dict) and depends["mongo"]["condition"] == "service_healthy"


def test_the_head_uses_the_mongo_service_as_its_database(services):
    assert environment(services["headnode"])["MONGODB_URI"] == "mongodb://mongo:27017/"


def test_compute_nodes_wait_for_a_healthy_head(services):
    assert services["headnode"].get("healthcheck", {}).get("test"), "headnode needs a healthcheck"
    for name in NODE_SERVICES:
        assert services[name]["depends_on"]["headnode"]["condition"] == "service_healthy", name


def test_make_brings_up_four_compute_nodes_two_per_partition(services):
    recipe = " ".join(makefile_default_recipe())
    assert "docker compose" in recipe and " up" in recipe, "`make` must run `docker compose up`"
    for name in NODE_SERVICES:
        replicas = (services[name].get("deploy") or {}).get("replicas", 1)
        scaled = re.search(rf"--scale[ =]{re.escape(name)}=(\d+)", recipe)
        count = int(scaled[1]) if scaled else replicas
        assert count == 2, f"{name}: {count} replicas"


def test_each_partition_service_has_its_partition_and_its_data_at_slash_data(services):
    for name, partition in NODE_SERVICES.items():
        env = environment(services[name])
        assert env["CM_PARTITION"] == partition
        assert env["CM_DATA_ROOT"] == "/data"
        assert relpath(mount_source(services[name], "/data") or "") == f"drive/data/{partition}"


def test_head_and_nodes_share_home_and_the_run_dir_at_the_same_paths(services):
    run_dirs = set()
    for name in CM_SERVICES:
        service = services[name]
        assert relpath(mount_source(service, "/home") or "") == "drive/home", name
        run_dir = environment(service).get("CM_RUN_DIR") or image_env(dockerfile_of(service)).get("CM_RUN_DIR")
        assert run_dir, f"{name}: CM_RUN_DIR must be set (keys and the head's socket live there)"
        source = mount_source(service, run_dir)
        assert source is not None, f"{name}: CM_RUN_DIR {run_dir} must be a shared mount"
        run_dirs.add((relpath(source), run_dir))
    assert len(run_dirs) == 1, f"every cm container must mount one run dir at one path: {run_dirs}"
    assert next(iter(run_dirs))[0].startswith("drive/run")


def test_nodes_reach_the_head_by_its_service_name_and_port(services):
    head = environment(services["headnode"])
    head_port = head.get("CM_HEAD_PORT", DEFAULTS["CM_HEAD_PORT"])
    assert head.get("CM_BIND_HOST", DEFAULTS["CM_BIND_HOST"]) == "0.0.0.0"
    for name in NODE_SERVICES:
        env = environment(services[name])
        assert env["CM_HEAD_HOST"] == "headnode", name
        assert env.get("CM_HEAD_PORT", DEFAULTS["CM_HEAD_PORT"]) == head_port, name


def test_cm_containers_run_under_an_init_that_reaps_orphans(services):
    for name in CM_SERVICES:
        assert services[name].get("init") is True, name


def test_cm_images_are_built_from_the_repository_root_with_their_own_dockerfile(services):
    expected = {"headnode": "headnode", "computenode-gpu": "computenode", "computenode-cpu": "computenode"}
    for name, image in expected.items():
        build = services[name]["build"]
        assert isinstance(build, dict) and os.path.normpath(build["context"]) == ".", name
        assert dockerfile_of(services[name]) == DOCKERFILES[image], name


# --- images -----------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_dockerfile_starts_from_python_3_11_slim(image):
    instructions = [(w, a) for w, a in dockerfile(DOCKERFILES[image]) if w != "ARG"]
    assert instructions[0][0] == "FROM"
    assert instructions[0][1].split()[0] == "python:3.11-slim"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_dockerfile_copies_the_package_and_pip_installs_it(image):
    path = DOCKERFILES[image]
    copied = {relpath(s) for sources, _ in copies(path) for s in sources}
    assert {"pyproject.toml", "cm"} <= copied
    runs = [args for word, args in dockerfile(path) if word == "RUN"]
    assert any(re.search(r"\bpip install (?:--?\S+ )*\.(?:\s|$|&)", run) for run in runs), runs


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context(image):
    patterns = dockerignore()
    for sources, _ in copies(DOCKERFILES[image]):
        for source in sources:
            assert (REPO / source).exists(), f"{image}: COPY {source}: no such file in the repository"
            assert not ignored(relpath(source), patterns), f"{image}: COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_drive_and_the_virtualenv_out_of_the_build_context():
    patterns = dockerignore()
    for path in ("drive/db/mongo/x", "drive/run/docker/keys", ".venv/bin/python", ".git/HEAD", ".build/bin"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "cm/daemon.py", "headnode/entrypoint.sh", "computenode/entrypoint.sh"):
        assert not ignored(path, patterns), path


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_image_runs_a_copied_entrypoint_script_and_a_console_script(image):
    path = DOCKERFILES[image]
    entrypoint, cmd = last(path, "ENTRYPOINT"), last(path, "CMD")
    destinations = {dest: sources for sources, dest in copies(path)}
    if entrypoint:
        assert entrypoint[0] in destinations, f"ENTRYPOINT {entrypoint[0]} is not copied into the image"
        assert all((REPO / s).is_file() for s in destinations[entrypoint[0]])
    assert cmd and cmd[0] in console_scripts(), f"CMD {cmd} is not a console script"
    assert cmd[:2] == ["cmdaemon", "head" if image == "headnode" else "node"]


# --- commands, settings, mounts ---------------------------------------------------


def test_every_command_and_healthcheck_of_a_cm_service_is_a_console_script(services):
    scripts = console_scripts()
    for name in CM_SERVICES:
        service = services[name]
        for key in ("command", "entrypoint"):
            if service.get(key):
                assert argv(service[key])[0] in scripts, f"{name}: {key} {service[key]}"
        test = argv(service.get("healthcheck", {}).get("test", []))
        if test and test[0] in ("CMD", "CMD-SHELL"):
            assert argv(" ".join(test[1:]) if test[0] == "CMD-SHELL" else test[1:])[0] in scripts, name
    assert argv(services["headnode"]["command"])[:2] == ["cmdaemon", "head"]
    for name in NODE_SERVICES:
        assert argv(services[name]["command"])[:2] == ["cmdaemon", "node"]


def test_the_console_scripts_point_at_functions_that_exist():
    for script, target in console_scripts().items():
        module, _, func = target.partition(":")
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{script}: no module {module}"
        names = {node.name for node in ast.parse(path.read_text()).body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert func in names, f"{script}: {module} has no function {func}"


def test_every_cm_environment_name_is_a_real_setting(services):
    used: dict[str, str] = {}
    for name, service in services.items():
        used.update({k: f"docker-compose.yml {name}" for k in environment(service)})
    for image, path in DOCKERFILES.items():
        used.update({k: f"{image}/Dockerfile" for k in image_env(path)})
    for script in entrypoint_scripts():
        used.update({k: str(script.relative_to(REPO)) for k in re.findall(r"\bCM_[A-Z0-9_]+", script.read_text())})
    unknown = {k: where for k, where in used.items() if (k.startswith("CM_") or k == "MONGODB_URI") and k not in SETTINGS}
    assert not unknown, f"not settings of cm/config.py: {unknown}"


def test_every_bind_mount_source_exists_or_is_made_by_make(services):
    made = made_by_make()
    for name, service in services.items():
        for source in bind_sources(service):
            path = relpath(source)
            assert not os.path.isabs(path) and not path.startswith(".."), f"{name}: {source} is outside the repository"
            created = any(m == path or m.startswith(path + "/") for m in made)
            assert (REPO / path).is_dir() or created, \
                f"{name}: mount source {source} neither exists nor is made by `make` (mkdir -p)"


# --- entrypoint scripts -----------------------------------------------------------


@pytest.mark.parametrize("script", ["headnode/entrypoint.sh", "computenode/entrypoint.sh"])
def test_the_entrypoint_script_is_valid_sh_and_ends_by_exec_ing_its_command(script):
    path = REPO / script
    assert path.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert re.search(r'^exec "\$@"$', path.read_text(), re.M), "the daemon must replace the shell (signals)"


def _fake_getent(bin_dir: Path, host: str, ip: str, fqdn: str | None) -> None:
    answer = f"printf '%s\\n' '{ip}      {fqdn}'" if fqdn else "exit 2"
    (bin_dir / "getent").write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"  'ahostsv4 {host}') printf '%s\\n' '{ip}      STREAM {host}' '{ip}      DGRAM' ;;\n"
        f"  '-s dns hosts {ip}') {answer} ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n")
    (bin_dir / "getent").chmod(0o755)


def _run_node_entrypoint(tmp_path: Path, fqdn: str | None, **env: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_getent(bin_dir, "3f2a9c1b0d7e", "172.18.0.5", fqdn)
    keys = tmp_path / "run" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "head.key").write_text("")
    (keys / "node.key_secret").write_text("")
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": "3f2a9c1b0d7e", "CM_RUN_DIR": str(tmp_path / "run"), **env}
    out = subprocess.run(["sh", str(REPO / "computenode" / "entrypoint.sh"), "env"], env=full,
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_scaled_compute_node_is_named_after_its_container(tmp_path):
    env = _run_node_entrypoint(tmp_path, "cm-computenode-gpu-2.cm_default")
    assert env["CM_NODE_NAME"] == "computenode-gpu-2"
    assert env["CM_TRANSFER_HOST"] == "cm-computenode-gpu-2"


def test_a_compute_node_falls_back_to_its_hostname_when_dns_does_not_know_it(tmp_path):
    env = _run_node_entrypoint(tmp_path, None)
    assert env["CM_NODE_NAME"] == "3f2a9c1b0d7e"
    assert "CM_TRANSFER_HOST" not in env


def test_a_node_name_given_in_the_environment_is_kept(tmp_path):
    env = _run_node_entrypoint(tmp_path, "cm-computenode-gpu-2.cm_default", CM_NODE_NAME="n7", CM_TRANSFER_HOST="n7.lan")
    assert (env["CM_NODE_NAME"], env["CM_TRANSFER_HOST"]) == ("n7", "n7.lan")


def test_the_head_entrypoint_creates_the_keys_nodes_wait_for(tmp_path):
    bindir = Path(sys.executable).parent
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "CM_RUN_DIR": str(run)}
    env.pop("CM_CONFIG", None)
    subprocess.run(["sh", str(REPO / "headnode" / "entrypoint.sh"), "true"], env=env, check=True,
                   capture_output=True, timeout=60)
    keys = run / "keys"
    assert {"head.key", "head.key_secret", "node.key", "node.key_secret"} <= {p.name for p in keys.iterdir()}
    assert (keys / "authorized" / "node.key").exists()
