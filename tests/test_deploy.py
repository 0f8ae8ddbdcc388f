"""Static checks of the deployment files under deploy/ (no Docker, Kubernetes or cloud needed).

Each rule is a small checker that returns a list of problems, so the same function runs over
the real files and, in the negative tests at the end, over deliberately bad input that it must
flag. Nothing here builds an image or talks to a cluster; see deploy/README.md for what that
leaves unverified.
"""

from __future__ import annotations

import base64
import configparser
import copy
import fnmatch
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
MLFLOW_DOCKERFILE = DEPLOY / "mlflow" / "Dockerfile"
COMPOSE = DEPLOY / "mlflow" / "docker-compose.yaml"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"

PLACEHOLDER = "REPLACE_ME"
TRIAL_DRIVER = "trial_driver"  # amid_ray.cluster.TRIAL_DRIVER_RESOURCE (not imported: needs ray)
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------- loading


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (path, key, value) of nested dicts/lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{path}.{key}" if path else str(key)
            yield here, key, value
            yield from walk(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from walk(value, f"{path}[{i}]")


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)


# --------------------------------------------------------------------------- generic checkers


def k8s_required_problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a mapping"]
    problems = [
        f"missing {key}"
        for key in ("apiVersion", "kind")
        if not isinstance(doc.get(key), str) or not doc.get(key)
    ]
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        problems.append("missing metadata.name")
    return problems


_FLOATING_TAGS = {"latest", "stable", "nightly", "edge", "main", "master", "dev", "rolling"}
_VERSIONED_TAG = re.compile(r"\d+\.\d+|\d{4}-\d{2}-\d{2}")


def image_problems(ref: str) -> list[str]:
    """An image reference must be pinned: a digest, or a version tag (X.Y… or a release date)."""
    if not isinstance(ref, str) or not ref.strip():
        return [f"empty image reference {ref!r}"]
    if "$" in ref:
        return [f"{ref}: unresolved variable in image reference"]
    if "@" in ref:
        digest = ref.split("@", 1)[1]
        if re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            return []
        return [f"{ref}: malformed digest"]
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{ref}: no tag (means :latest)"]
    tag = last.rsplit(":", 1)[1]
    if tag.lower() in _FLOATING_TAGS:
        return [f"{ref}: floating tag {tag!r}"]
    if not _VERSIONED_TAG.search(tag):
        return [f"{ref}: tag {tag!r} is not a version"]
    return []


def image_refs(obj: Any) -> list[str]:
    return [
        value
        for _, key, value in walk(obj)
        if key in ("image", "head_image", "worker_image") and isinstance(value, str)
    ]


_SECRET_WORDS = (
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "KEYS",
    "CREDENTIAL",
    "CREDENTIALS",
)


# A variable ending in one of these names the place a secret is kept, not the secret.
_LOCATION_WORDS = ("PATH", "FILE", "DIR")


def is_secret_name(name: str) -> bool:
    """PASSWORD/SECRET/TOKEN/KEY… as (the end of) a word of the name: AWS_SECRET_ACCESS_KEY,
    HF_TOKEN, MLFLOW_TRACKING_PASSWORD, APIKEY; not TOKENIZERS_PARALLELISM, and not a name that
    ends in PATH/FILE/DIR (RAY_AUTH_TOKEN_PATH holds a file name)."""
    parts = re.split(r"[_\-.]", name.upper())
    return parts[-1] not in _LOCATION_WORDS and any(p.endswith(_SECRET_WORDS) for p in parts)


def k8s_env_problems(doc: Any) -> list[str]:
    """Secret-named container env vars must come from a Secret (valueFrom.secretKeyRef)."""
    problems = []
    for where, key, value in walk(doc):
        if key != "env" or not isinstance(value, list):
            continue
        for entry in value:
            if not isinstance(entry, dict) or not is_secret_name(str(entry.get("name", ""))):
                continue
            name = entry["name"]
            if "value" in entry:
                problems.append(f"{where}: {name} has an inline value")
            elif "secretKeyRef" not in (entry.get("valueFrom") or {}):
                problems.append(f"{where}: {name} does not come from a secretKeyRef")
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        problems += [
            f"ConfigMap key {k} looks secret: use a Secret"
            for k in (doc.get("data") or {})
            if is_secret_name(k)
        ]
    return problems


def secret_doc_problems(doc: Any, filename: str) -> list[str]:
    """Secrets exist only as clearly named examples whose every value is a placeholder."""
    if not isinstance(doc, dict) or doc.get("kind") != "Secret":
        return []
    problems = []
    if ".example." not in filename:
        problems.append(f"Secret {doc.get('metadata', {}).get('name')} outside an *.example.* file")
    values = dict(doc.get("stringData") or {})
    for key, encoded in (doc.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode(errors="replace")
    if not values:
        problems.append("Secret without keys")
    problems += [
        f"Secret key {k} holds a real-looking value"
        for k, v in values.items()
        if PLACEHOLDER not in str(v)
    ]
    return problems


_EXPOSING_KINDS = {"Ingress", "Gateway", "HTTPRoute", "TCPRoute", "GRPCRoute", "Route"}


def exposure_problems(doc: Any) -> list[str]:
    """Nothing reachable from outside the Kubernetes cluster."""
    if not isinstance(doc, dict):
        return []
    problems = []
    kind = doc.get("kind")
    if kind in _EXPOSING_KINDS:
        problems.append(f"{kind} {doc.get('metadata', {}).get('name')} exposes a service")
    if kind == "Service":
        spec = doc.get("spec") or {}
        if spec.get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service of type {spec.get('type')}")
        if spec.get("externalIPs"):
            problems.append("Service with externalIPs")
    for where, key, value in walk(doc):
        if key == "serviceType" and value not in (None, "ClusterIP"):
            problems.append(f"{where} = {value}")
        if key == "enableIngress" and value:
            problems.append(f"{where} is on")
        if key == "hostNetwork" and value:
            problems.append(f"{where}: pod on the node's network")
        if key == "hostPort":
            problems.append(f"{where}: port opened on the node")
    return problems


def parse_ray_resources(text: str) -> dict:
    """The JSON of `--resources` / rayStartParams.resources, with shell/KubeRay quoting removed."""
    text = text.strip().strip("'").strip('"').replace('\\"', '"')
    return json.loads(text)


def command_secret_problems(command: str) -> list[str]:
    """`NAME=value` / `-e NAME=value` with a secret-like NAME must take the value from $VAR."""
    problems = []
    for match in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)=(\S*)", command):
        name, value = match.groups()
        if is_secret_name(name) and not value.strip("'\"").startswith("$"):
            problems.append(f"{name} set inline in a command")
    return problems


# --------------------------------------------------------------------------- KubeRay


def _ray_container(template: dict) -> dict:
    return (template.get("spec") or {}).get("containers", [{}])[0]


def _group_problems(group: dict, label: str) -> list[str]:
    problems = []
    template = group.get("template") or {}
    pod = template.get("spec") or {}
    container = _ray_container(template)
    problems += [f"{label}: {p}" for p in image_problems(container.get("image", ""))]
    security = pod.get("securityContext") or {}
    if not (security.get("runAsNonRoot") is True and security.get("runAsUser", 1) != 0):
        problems.append(f"{label}: pod not forced to run as non-root")
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    mounted = [m for m in container.get("volumeMounts", []) if m.get("name") in claims]
    envs = {e.get("name"): e for e in container.get("env", [])}
    s3_env = any(str(e.get("value", "")).startswith("s3://") for e in envs.values())
    if not mounted and not s3_env:
        problems.append(f"{label}: no shared storage (PVC mount or s3:// URI)")
    tracking = envs.get("MLFLOW_TRACKING_URI") or {}
    from_secret_ref = "secretKeyRef" in (tracking.get("valueFrom") or {})
    from_env_from = any("secretRef" in ef for ef in container.get("envFrom", []))
    if not (from_secret_ref or from_env_from):
        problems.append(f"{label}: MLFLOW_TRACKING_URI does not come from a Secret")
    return problems


def raycluster_spec_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return ["RayCluster spec missing"]
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(spec.get("rayVersion", ""))):
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not an exact version")
    head = spec.get("headGroupSpec") or {}
    params = head.get("rayStartParams") or {}
    try:
        head_resources = parse_ray_resources(params.get("resources", "{}"))
    except ValueError:
        head_resources = {}
        problems.append("head rayStartParams.resources is not JSON")
    if not head_resources.get(TRIAL_DRIVER, 0) > 0:
        problems.append(f"head does not advertise {TRIAL_DRIVER}")
    head_limits = _ray_container(head.get("template") or {}).get("resources") or {}
    if str(params.get("num-gpus")) != "0" or any(
        GPU in (head_limits.get(k) or {}) for k in ("limits", "requests")
    ):
        problems.append("head must have no GPU (num-gpus '0', no nvidia.com/gpu)")
    problems += _group_problems(head, "head")
    workers = spec.get("workerGroupSpecs") or []
    if not workers:
        problems.append("no worker group")
    gpu_groups = 0
    for group in workers:
        label = f"worker group {group.get('groupName')}"
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
            problems.append(f"{label}: bad autoscaling bounds min={low} max={high}")
        elif not low <= group.get("replicas", low) <= high:
            problems.append(f"{label}: replicas outside [minReplicas, maxReplicas]")
        limits = (_ray_container(group.get("template") or {}).get("resources") or {}).get(
            "limits"
        ) or {}
        if int(limits.get(GPU, 0)) >= 1:
            gpu_groups += 1
        problems += _group_problems(group, label)
    if workers and not gpu_groups:
        problems.append(f"no worker group with a {GPU} limit")
    return problems


def rayjob_problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict) or doc.get("kind") != "RayJob":
        return ["not a RayJob"]
    spec = doc.get("spec") or {}
    problems = []
    entrypoint = str(spec.get("entrypoint", ""))
    if "tune_amid.py" not in entrypoint:
        problems.append("entrypoint does not run tune_amid.py")
    problems += command_secret_problems(entrypoint)
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not (isinstance(ttl, int) and ttl >= 0):
        problems.append("ttlSecondsAfterFinished missing")
    if "rayClusterSpec" in spec:
        problems += raycluster_spec_problems(spec["rayClusterSpec"])
    elif not spec.get("clusterSelector"):
        problems.append("neither rayClusterSpec nor clusterSelector")
    return problems


# --------------------------------------------------------------------------- cluster launcher

_GPU_INSTANCE = re.compile(r"^(g\d|p\d|gr\d)", re.IGNORECASE)


def _dashboard_hosts(command: str) -> list[str]:
    tokens = shlex.split(command.replace(";", " ; "))
    hosts = []
    for i, token in enumerate(tokens):
        if token.startswith("--dashboard-host="):
            hosts.append(token.split("=", 1)[1])
        elif token == "--dashboard-host" and i + 1 < len(tokens):
            hosts.append(tokens[i + 1])
    return hosts


def _ray_start_resources(command: str) -> dict:
    tokens = shlex.split(command.replace(";", " ; "))
    for i, token in enumerate(tokens):
        if token.startswith("--resources="):
            return parse_ray_resources(token.split("=", 1)[1])
        if token == "--resources" and i + 1 < len(tokens):
            return parse_ray_resources(tokens[i + 1])
    return {}


def launcher_problems(cfg: Any) -> list[str]:
    if not isinstance(cfg, dict):
        return ["not a mapping"]
    problems = []
    provider = cfg.get("provider") or {}
    if provider.get("type") != "aws":
        problems.append("provider.type is not aws")
    if not provider.get("region"):
        problems.append("provider.region missing")
    types = cfg.get("available_node_types") or {}
    head_type = cfg.get("head_node_type")
    if head_type not in types:
        problems.append(f"head_node_type {head_type!r} not in available_node_types")
    else:
        head = types[head_type]
        if not (head.get("resources") or {}).get(TRIAL_DRIVER, 0) > 0:
            problems.append(f"head node type does not declare {TRIAL_DRIVER}")
        if _GPU_INSTANCE.match(str((head.get("node_config") or {}).get("InstanceType", ""))):
            problems.append("head node type is a GPU instance")
    max_total = cfg.get("max_workers")
    gpu_workers = 0
    for name, node in types.items():
        if name == head_type:
            continue
        low, high = node.get("min_workers"), node.get("max_workers")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
            problems.append(f"{name}: bad min_workers/max_workers {low}/{high}")
        elif isinstance(max_total, int) and high > max_total:
            problems.append(f"{name}: max_workers above the cluster's max_workers")
        instance = str((node.get("node_config") or {}).get("InstanceType", ""))
        if _GPU_INSTANCE.match(instance) or (node.get("resources") or {}).get("GPU", 0) > 0:
            gpu_workers += 1
    if not gpu_workers:
        problems.append("no GPU worker node type")
    docker = cfg.get("docker") or {}
    refs = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    if not refs:
        problems.append("no docker image")
    for ref in refs:
        problems += image_problems(ref)
    head_cmds = [c for c in cfg.get("head_start_ray_commands") or [] if "ray start" in c]
    if not any("--head" in c for c in head_cmds):
        problems.append("no `ray start --head` in head_start_ray_commands")
    for command in head_cmds:
        if _dashboard_hosts(command) != ["127.0.0.1"]:
            problems.append("head's ray start must set --dashboard-host 127.0.0.1")
        if not _ray_start_resources(command).get(TRIAL_DRIVER, 0) > 0:
            problems.append(f"head's ray start does not give {TRIAL_DRIVER}")
    command_lists = [k for k in cfg if k.endswith("_commands")]
    every_command = [c for k in command_lists for c in cfg.get(k) or []]
    every_command += list(docker.get("run_options") or [])
    for command in every_command:
        hosts = _dashboard_hosts(command)
        if any(h not in ("127.0.0.1", "localhost") for h in hosts):
            problems.append(f"dashboard bound to {hosts}")
        problems += command_secret_problems(command)
        if re.search(r"\bMLFLOW_TRACKING_\w+=(?!\$)", command):
            problems.append("MLflow settings written inline instead of taken from the environment")
    return problems


# --------------------------------------------------------------------------- docker compose

_COMPOSE_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])[^}]*)?\}")


def compose_problems(compose: Any) -> list[str]:
    if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
        return ["no services"]
    problems = []
    for name, service in compose["services"].items():
        if "image" not in service and "build" not in service:
            problems.append(f"{name}: neither image nor build")
        if "image" in service:
            problems += [f"{name}: {p}" for p in image_problems(service["image"])]
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host bypasses the port bindings")
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                if port.get("host_ip") != "127.0.0.1":
                    problems.append(f"{name}: port {port} not bound to 127.0.0.1")
            elif not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port!r} not bound to 127.0.0.1")
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(
                item.split("=", 1) if "=" in item else (item, None) for item in environment
            )
        for var, value in environment.items():
            if value is None:
                continue  # passed through from the shell
            value = str(value)
            if is_secret_name(var) and not _COMPOSE_REF.fullmatch(value):
                problems.append(f"{name}: {var} is not a ${{VAR}} reference to the env file")
            for userinfo in re.findall(r"://[^/@\s]*:([^/@\s]+)@", value):
                if not _COMPOSE_REF.fullmatch(userinfo):
                    problems.append(f"{name}: {var} embeds a literal password")
        for text in strings([service.get("command"), service.get("entrypoint")]):
            problems += [f"{name}: {p}" for p in command_secret_problems(text)]
    return problems


def compose_variables(compose: dict) -> set[str]:
    """Variables the compose file takes from .env without a default (`${X}`, `${X:?msg}`)."""
    needed = set()
    for text in strings(compose):
        for match in _COMPOSE_REF.finditer(text):
            if match.group(2) not in (":-", "-"):
                needed.add(match.group(1))
    return needed


def env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            word, _, args = buffer.strip().partition(" ")
            instructions.append((word.upper(), args.strip()))
        buffer = ""
    return instructions


def dockerfile_args(instructions: list[tuple[str, str]], *, before_first_from: bool) -> dict:
    args: dict[str, str | None] = {}
    for word, rest in instructions:
        if word == "FROM" and before_first_from:
            break
        if word == "ARG":
            name, sep, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"') if sep else args.get(name.strip())
    return args


def _substitute(text: str, values: dict) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2)) or m.group(0), text
    )


def dockerfile_from_images(text: str) -> list[str]:
    """Base images of every stage, global ARG defaults filled in; stage aliases skipped."""
    instructions = dockerfile_instructions(text)
    global_args = dockerfile_args(instructions, before_first_from=True)
    images, aliases = [], set()
    for word, rest in instructions:
        if word != "FROM":
            continue
        tokens = [t for t in rest.split() if not t.startswith("--")]
        image = _substitute(tokens[0], global_args)
        if len(tokens) >= 3 and tokens[1].upper() == "AS":
            aliases.add(tokens[2])
        if image not in aliases and image != "scratch":
            images.append(image)
    return images


def dockerfile_common_problems(text: str) -> list[str]:
    """Any Dockerfile: pinned bases, and it ends as a non-root user."""
    problems = []
    instructions = dockerfile_instructions(text)
    if not any(word == "FROM" for word, _ in instructions):
        return ["no FROM"]
    for image in dockerfile_from_images(text):
        problems += [f"FROM {p}" for p in image_problems(image)]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [rest for word, rest in instructions[last_from:] if word == "USER"]
    if not users:
        problems.append("final stage has no USER (runs as root)")
    elif users[-1].split(":")[0].strip() in ("root", "0"):
        problems.append(f"final USER is root ({users[-1]})")
    return problems


def dockerfile_copy_sources(text: str) -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(rest)
        if any(t.startswith("--from") for t in tokens):
            continue
        tokens = [t for t in tokens if not t.startswith("--")]
        sources += tokens[:-1]
    return sources


def project_dockerfile_problems(text: str) -> list[str]:
    """The amid-ray image: pinned torch/Ray, Python >= 3.11, the project installed, CPU variant."""
    problems = dockerfile_common_problems(text)
    instructions = dockerfile_instructions(text)
    args = dockerfile_args(instructions, before_first_from=False)
    runs = "\n".join(rest for word, rest in instructions if word == "RUN")
    for arg, package in (("TORCH_VERSION", "torch"), ("RAY_VERSION", "ray")):
        if not re.fullmatch(r"\d+\.\d+\.\d+", str(args.get(arg))):
            problems.append(f"ARG {arg} has no exact version default")
        if not re.search(rf"{package}(\[[^\]]*\])?==\$\{{?{arg}\b", runs):
            problems.append(f"{package} is not installed as =={arg}")
    if not re.search(r"pip install\b[^\n]*\s\.(\s|$)", runs):
        problems.append("the project is not installed (pip install .)")
    if "pyproject.toml" not in dockerfile_copy_sources(text):
        problems.append("pyproject.toml is not copied into the image")
    if not re.search(r"version_info\s*>=\s*\(3,\s*(1[1-9]|[2-9]\d)\)", runs):
        problems.append("the build does not assert Python >= 3.11")
    if "VARIANT" not in args or "download.pytorch.org/whl/cpu" not in text:
        problems.append("no CPU variant (ARG VARIANT + the CPU torch index)")
    return problems


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent folder of it) wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = (pattern[1:] if negate else pattern).strip("/")
        candidates = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


# =========================================================================== tests: real files


def test_deploy_has_the_expected_files():
    for name in (
        "docker/Dockerfile",
        "docker/Dockerfile.dockerignore",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/storage.yaml",
        "kuberay/secrets.example.yaml",
        "kuberay/serviceaccounts.yaml",
        "kuberay/networkpolicy.yaml",
        "ray-cluster.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/.env.example",
        "README.md",
    ):
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=rel)
def test_kubernetes_manifests(path):
    problems = []
    for doc in load_docs(path):
        problems += k8s_required_problems(doc)
        problems += k8s_env_problems(doc)
        problems += secret_doc_problems(doc, path.name)
        problems += exposure_problems(doc)
        problems += [p for ref in image_refs(doc) for p in image_problems(ref)]
    assert not problems, f"{rel(path)}: {problems}"


def test_raycluster():
    doc = load_one(RAYCLUSTER)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert raycluster_spec_problems(doc["spec"]) == []


def test_rayjob_runs_a_search_on_the_raycluster_spec():
    job = load_one(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert rayjob_problems(job) == []
    # One cluster definition: the RayJob embeds exactly the RayCluster's spec.
    assert job["spec"]["rayClusterSpec"] == load_one(RAYCLUSTER)["spec"]
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["bash", "-c"] and "--storage" in entry[2] and "--config" in entry[2]


def test_secrets_and_volumes_referenced_by_the_manifests_exist():
    """Every secretKeyRef/secretRef and PVC a manifest uses is defined in deploy/kuberay."""
    secrets, claims = {}, {}
    for _, doc in k8s_docs():
        if doc["kind"] == "Secret":
            secrets[doc["metadata"]["name"]] = set(doc.get("stringData") or {}) | set(
                doc.get("data") or {}
            )
        if doc["kind"] == "PersistentVolumeClaim":
            claims[doc["metadata"]["name"]] = doc["spec"]["accessModes"]
    missing = []
    for path, doc in k8s_docs():
        for where, key, value in walk(doc):
            if key == "secretKeyRef" and value["key"] not in secrets.get(value["name"], ()):
                missing.append(f"{rel(path)} {where}: {value['name']}/{value['key']}")
            if key == "secretRef" and value["name"] not in secrets:
                missing.append(f"{rel(path)} {where}: {value['name']}")
            if key == "persistentVolumeClaim" and value["claimName"] not in claims:
                missing.append(f"{rel(path)} {where}: PVC {value['claimName']}")
    assert not missing
    assert "ReadWriteMany" in claims["amid-shared"]


def test_cluster_launcher():
    cfg = load_one(LAUNCHER)
    assert launcher_problems(cfg) == []


def test_cluster_launcher_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates ray without importing it
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_file = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema_file.is_file():
        pytest.skip("this ray has no autoscaler/ray-schema.json")
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(load_one(LAUNCHER), schema)
    bad = load_one(LAUNCHER)
    bad["available_node_types"]["gpu-worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_compose():
    assert compose_problems(load_one(COMPOSE)) == []


def test_compose_mlflow_server_is_protected_and_uses_postgres_and_s3():
    mlflow = load_one(COMPOSE)["services"]["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "ports" not in load_one(COMPOSE)["services"]["postgres"]


def test_compose_env_file_example_defines_every_variable_with_placeholders():
    compose = load_one(COMPOSE)
    example = env_file_values(DEPLOY / "mlflow" / ".env.example")
    assert compose_variables(compose) - set(example) == set()
    for key, value in example.items():
        if is_secret_name(key) or key.endswith("_USER") or key.endswith("USERNAME"):
            assert value == PLACEHOLDER or key == "POSTGRES_USER", key
    client = env_file_values(DEPLOY / "mlflow" / "client.env.example")
    assert set(client) >= {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"}
    assert all(value == PLACEHOLDER for value in client.values())


def test_mlflow_auth_settings_hold_no_credentials():
    parser = configparser.ConfigParser()
    parser.read(DEPLOY / "mlflow" / "basic_auth.ini")
    section = parser["mlflow"]
    assert section["database_uri"].startswith("sqlite:////var/lib/mlflow/")
    assert section["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert not section.get("admin_password")


def test_kubernetes_mlflow_server_has_auth_and_host_allowlist():
    deployment = next(
        doc for doc in load_docs(KUBERAY / "mlflow.yaml") if doc["kind"] == "Deployment"
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert "*" not in allowed and "amid-mlflow:*" in allowed


def test_project_dockerfile():
    assert project_dockerfile_problems(DOCKERFILE.read_text()) == []


def test_mlflow_dockerfile():
    text = MLFLOW_DOCKERFILE.read_text()
    assert dockerfile_common_problems(text) == []
    assert re.search(r"mlflow\[auth\]==\$\{MLFLOW_VERSION\}", text)


def test_dockerfile_copies_only_what_its_dockerignore_lets_in():
    patterns = dockerignore_patterns(DOCKERIGNORE)
    for source in dockerfile_copy_sources(DOCKERFILE.read_text()):
        if any(ch in source for ch in "*?["):
            continue  # optional, may match nothing
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source), f"COPY {source}: excluded"
    for junk in (
        ".venv/bin/python",
        "amid_runs/x",
        ".git/HEAD",
        "amid_ray/__pycache__/a.pyc",
        "tests/test_deploy.py",
        "deploy/mlflow/.env",
    ):
        assert dockerignore_excludes(patterns, junk), junk


def test_versions_and_images_agree_across_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = dockerfile_args(dockerfile_instructions(DOCKERFILE.read_text()), before_first_from=False)
    cluster, job, launcher = load_one(RAYCLUSTER), load_one(RAYJOB), load_one(LAUNCHER)
    assert (
        cluster["spec"]["rayVersion"]
        == job["spec"]["rayClusterSpec"]["rayVersion"]
        == args["RAY_VERSION"]
    )
    project_images = {ref for doc in (cluster, job, launcher) for ref in image_refs(doc)}
    project_images |= {launcher["docker"]["image"]}
    assert len(project_images) == 1, project_images
    tag = project_images.pop().rsplit(":", 1)[1]
    assert tag.startswith(project["version"] + "-"), (tag, project["version"])
    mlflow_args = dockerfile_args(
        dockerfile_instructions(MLFLOW_DOCKERFILE.read_text()), before_first_from=False
    )
    compose_mlflow = load_one(COMPOSE)["services"]["mlflow"]
    k8s_mlflow = image_refs(load_docs(KUBERAY / "mlflow.yaml"))
    version = mlflow_args["MLFLOW_VERSION"]
    assert compose_mlflow["build"]["args"]["MLFLOW_VERSION"] == version
    assert compose_mlflow["image"].endswith(":" + version)
    assert k8s_mlflow and all(ref.endswith(":" + version) for ref in k8s_mlflow)


def test_no_credentials_anywhere_in_deploy():
    """Key-shaped strings that should never be committed, in any file under deploy/."""
    patterns = {
        "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
        "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    }
    found = [
        f"{rel(path)}: {what}"
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for what, pattern in patterns.items()
        if pattern.search(path.read_text())
    ]
    assert not found


def _ignored_by_deploy_gitignore(path: Path) -> bool:
    ignore = path.parent / ".gitignore"
    if not ignore.is_file():
        return False
    return dockerignore_excludes(dockerignore_patterns(ignore), path.name)


def test_readme_mentions_only_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    mentioned = set(re.findall(r"deploy/[\w./-]*\w", text))
    assert mentioned, "README names no deploy files"
    missing = [m for m in mentioned if not (ROOT / m).exists()]
    # Files the reader creates (their filled-in secrets) are named but git-ignored, never shipped.
    assert [m for m in missing if not _ignored_by_deploy_gitignore(ROOT / m)] == []
    for phrase in (
        "ray job submit",
        "kubectl apply",
        "ray up deploy/ray-cluster.yaml",
        "amid-ray resume",
        "--resume",
        "port-forward",
        "gpus_per_worker",
        "max_concurrent",
        "not verified",
    ):
        assert phrase in text, phrase


# =========================================================================== tests: negatives
# Every checker must flag a bad input: a rule that cannot fail checks nothing.


def _bad_raycluster_specs() -> list[tuple[str, dict, str]]:
    good = load_one(RAYCLUSTER)["spec"]
    cases = []

    def variant(label, change, expect):
        spec = copy.deepcopy(good)
        change(spec)
        cases.append((label, spec, expect))

    variant(
        "no autoscaler",
        lambda s: s.update(enableInTreeAutoscaling=False),
        "enableInTreeAutoscaling",
    )
    variant(
        "no trial_driver",
        lambda s: s["headGroupSpec"]["rayStartParams"].pop("resources"),
        TRIAL_DRIVER,
    )
    variant(
        "GPU head",
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].update({GPU: 1}),
        "no GPU",
    )
    variant(
        "no GPU workers",
        lambda s: [
            g["template"]["spec"]["containers"][0]["resources"]["limits"].pop(GPU)
            for g in s["workerGroupSpecs"]
        ],
        GPU,
    )
    variant(
        "min > max",
        lambda s: s["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2),
        "bounds",
    )
    variant("no maxReplicas", lambda s: s["workerGroupSpecs"][0].pop("maxReplicas"), "bounds")
    variant(
        "latest image",
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            image="registry.example.com/amid/amid-ray:latest"
        ),
        "floating tag",
    )
    variant(
        "root pod",
        lambda s: s["headGroupSpec"]["template"]["spec"].pop("securityContext"),
        "non-root",
    )
    variant(
        "no shared storage",
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            volumeMounts=[]
        ),
        "shared storage",
    )
    variant(
        "tracking URI inline",
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://x:5000"}]
        ),
        "MLFLOW_TRACKING_URI",
    )
    variant("floating rayVersion", lambda s: s.update(rayVersion="2"), "rayVersion")
    return cases


@pytest.mark.parametrize(
    "label,spec,expect", _bad_raycluster_specs(), ids=[c[0] for c in _bad_raycluster_specs()]
)
def test_raycluster_checker_flags(label, spec, expect):
    problems = raycluster_spec_problems(spec)
    assert any(expect in p for p in problems), (label, problems)


def test_rayjob_checker_flags():
    job = load_one(RAYJOB)
    for change, expect in (
        (lambda j: j["spec"].update(entrypoint="python other.py"), "tune_amid.py"),
        (lambda j: j["spec"].pop("shutdownAfterJobFinishes"), "shutdownAfterJobFinishes"),
        (lambda j: j["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
        (lambda j: j["spec"].pop("rayClusterSpec"), "clusterSelector"),
        (
            lambda j: j["spec"].update(
                entrypoint="MLFLOW_TRACKING_PASSWORD=hunter2 python tune_amid.py"
            ),
            "inline",
        ),
    ):
        bad = copy.deepcopy(job)
        change(bad)
        assert any(expect in p for p in rayjob_problems(bad)), expect
    selector = copy.deepcopy(job)
    selector["spec"].pop("rayClusterSpec")
    selector["spec"]["clusterSelector"] = {"ray.io/cluster": "amid-ray"}
    assert rayjob_problems(selector) == []


@pytest.mark.parametrize(
    "doc,expect",
    [
        ({"kind": "Pod"}, "apiVersion"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {}}, "metadata.name"),
        ({"apiVersion": "v1", "metadata": {"name": "x"}}, "kind"),
    ],
)
def test_required_fields_checker_flags(doc, expect):
    assert any(expect in p for p in k8s_required_problems(doc))


@pytest.mark.parametrize(
    "ref,ok",
    [
        ("nvidia/cuda:12.8.1-base-ubuntu24.04", True),
        ("registry.example.com:5000/amid/amid-ray:0.1.0-gpu", True),
        ("minio/minio:RELEASE.2025-04-22T22-12-26Z", True),
        ("ubuntu@sha256:" + "a" * 64, True),
        ("ubuntu", False),
        ("ubuntu:latest", False),
        ("ubuntu:noble", False),
        ("registry.example.com:5000/amid-ray", False),
        ("rayproject/ray:nightly-gpu", False),
        ("${IMAGE}", False),
    ],
)
def test_image_checker(ref, ok):
    assert (image_problems(ref) == []) is ok, image_problems(ref)


@pytest.mark.parametrize(
    "name,secret",
    [
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("HF_TOKEN", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", True),
        ("MY_APIKEY", True),
        ("RAY_AUTH_TOKEN", True),
        ("RAY_AUTH_TOKEN_PATH", False),
        ("MLFLOW_TRACKING_SERVER_CERT_PATH", False),
        ("GOOGLE_APPLICATION_CREDENTIALS_FILE", False),
        ("TOKENIZERS_PARALLELISM", False),
        ("MLFLOW_TRACKING_URI", False),
        ("HF_HOME", False),
    ],
)
def test_secret_name_rule(name, secret):
    assert is_secret_name(name) is secret


def test_env_checker_flags_inline_and_non_secret_sources():
    inline = {
        "kind": "Pod",
        "spec": {
            "containers": [{"env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}]}]
        },
    }
    config_map = {
        "kind": "Pod",
        "spec": {
            "containers": [
                {
                    "env": [
                        {
                            "name": "HF_TOKEN",
                            "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}},
                        }
                    ]
                }
            ]
        },
    }
    secret_cm = {"kind": "ConfigMap", "data": {"AWS_SECRET_ACCESS_KEY": "x"}}
    ok = {
        "kind": "Pod",
        "spec": {
            "containers": [
                {
                    "env": [
                        {
                            "name": "HF_TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                        },
                        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                    ]
                }
            ]
        },
    }
    assert any("inline" in p for p in k8s_env_problems(inline))
    assert any("secretKeyRef" in p for p in k8s_env_problems(config_map))
    assert any("ConfigMap" in p for p in k8s_env_problems(secret_cm))
    assert k8s_env_problems(ok) == []


def test_secret_checker_flags_real_values_and_unexampled_secrets():
    real = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"PASSWORD": "hunter2"}}
    encoded = {
        "kind": "Secret",
        "metadata": {"name": "s"},
        "data": {"PASSWORD": base64.b64encode(b"hunter2").decode()},
    }
    placeholder = {
        "kind": "Secret",
        "metadata": {"name": "s"},
        "stringData": {"PASSWORD": PLACEHOLDER},
    }
    assert any("real-looking" in p for p in secret_doc_problems(real, "secrets.example.yaml"))
    assert any("real-looking" in p for p in secret_doc_problems(encoded, "secrets.example.yaml"))
    assert any("example" in p for p in secret_doc_problems(placeholder, "secrets.yaml"))
    assert secret_doc_problems(placeholder, "secrets.example.yaml") == []


@pytest.mark.parametrize(
    "doc,expect",
    [
        ({"kind": "Service", "spec": {"type": "LoadBalancer"}}, "LoadBalancer"),
        ({"kind": "Service", "spec": {"type": "NodePort"}}, "NodePort"),
        ({"kind": "Ingress", "metadata": {"name": "ui"}}, "Ingress"),
        (
            {"kind": "RayCluster", "spec": {"headGroupSpec": {"serviceType": "LoadBalancer"}}},
            "serviceType",
        ),
        (
            {"kind": "RayCluster", "spec": {"headGroupSpec": {"enableIngress": True}}},
            "enableIngress",
        ),
        (
            {
                "kind": "Pod",
                "spec": {"containers": [{"ports": [{"containerPort": 8265, "hostPort": 8265}]}]},
            },
            "hostPort",
        ),
    ],
)
def test_exposure_checker_flags(doc, expect):
    assert any(expect in p for p in exposure_problems(doc))


def test_launcher_checker_flags():
    good = load_one(LAUNCHER)
    head_cmd = good["head_start_ray_commands"][-1]

    def bad(change):
        cfg = copy.deepcopy(good)
        change(cfg)
        return launcher_problems(cfg)

    cases = [
        (lambda c: c["provider"].update(type="gcp"), "aws"),
        (lambda c: c["provider"].pop("region"), "region"),
        (lambda c: c.update(head_node_type="missing"), "head_node_type"),
        (
            lambda c: c["available_node_types"]["gpu-worker"].update(min_workers=3, max_workers=1),
            "min_workers",
        ),
        (
            lambda c: c["available_node_types"]["gpu-worker"]["node_config"].update(
                InstanceType="m6i.large"
            ),
            "GPU worker",
        ),
        (lambda c: c["docker"].update(image="registry.example.com/amid/amid-ray"), "no tag"),
        (
            lambda c: c.update(
                head_start_ray_commands=[
                    head_cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                ]
            ),
            "127.0.0.1",
        ),
        (
            lambda c: c.update(
                head_start_ray_commands=[head_cmd.replace("--dashboard-host=127.0.0.1", "")]
            ),
            "127.0.0.1",
        ),
        (
            lambda c: c.update(head_start_ray_commands=[head_cmd.replace(TRIAL_DRIVER, "other")]),
            TRIAL_DRIVER,
        ),
        (
            lambda c: c["docker"]["run_options"].append("-e MLFLOW_TRACKING_PASSWORD=hunter2"),
            "inline",
        ),
        (
            lambda c: c["setup_commands"].append(
                "echo MLFLOW_TRACKING_URI=http://10.0.0.5:5000 >> ~/.bashrc"
            ),
            "environment",
        ),
    ]
    for change, expect in cases:
        problems = bad(change)
        assert any(expect in p for p in problems), (expect, problems)


def test_compose_checker_flags():
    good = load_one(COMPOSE)

    def bad(change):
        compose = copy.deepcopy(good)
        change(compose["services"])
        return compose_problems(compose)

    cases = [
        (lambda s: s["mlflow"].update(ports=["5000:5000"]), "127.0.0.1"),
        (lambda s: s["mlflow"].update(ports=["0.0.0.0:5000:5000"]), "127.0.0.1"),
        (lambda s: s["mlflow"].update(ports=[{"target": 5000, "published": 5000}]), "127.0.0.1"),
        (lambda s: s["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"), "${VAR}"),
        (
            lambda s: s["mlflow"]["environment"].update(
                MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@postgres/mlflow"
            ),
            "literal password",
        ),
        (lambda s: s["minio"].update(image="minio/minio"), "no tag"),
        (lambda s: s["postgres"].update(image="postgres:latest"), "floating"),
        (lambda s: s["mlflow"].update(network_mode="host"), "network_mode"),
        (lambda s: s["mlflow"].update(environment=["AWS_SECRET_ACCESS_KEY=abc"]), "${VAR}"),
    ]
    for change, expect in cases:
        problems = bad(change)
        assert any(expect in p for p in problems), (expect, problems)


def test_dockerfile_checkers_flag():
    good = DOCKERFILE.read_text()
    cases = [
        (good.replace("nvidia/cuda:12.8.1-base-ubuntu24.04", "nvidia/cuda:latest"), "floating"),
        (good.replace("ARG CPU_BASE_IMAGE=ubuntu:24.04", "ARG CPU_BASE_IMAGE=ubuntu"), "no tag"),
        (good.replace("USER 1000:1000", "USER root"), "root"),
        (good.replace("USER 1000:1000", ""), "no USER"),
        (good.replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION"), "TORCH_VERSION"),
        (
            good.replace('"ray[default,train,tune]==${RAY_VERSION}"', '"ray[default,train,tune]"'),
            "==",
        ),
        (
            good.replace(
                "pip install --constraint /opt/constraints.txt .",
                "pip install --constraint /opt/constraints.txt amid-ray",
            ),
            "pip install .",
        ),
        (good.replace("(3, 11)", "(3, 8)"), "3.11"),
        (
            good.replace("https://download.pytorch.org/whl/cpu", "https://example.com/simple"),
            "CPU variant",
        ),
    ]
    for text, expect in cases:
        assert text != good, expect
        problems = project_dockerfile_problems(text)
        assert any(expect in p for p in problems), (expect, problems)
    # A USER switched back to root in a later stage is caught too.
    assert any(
        "root" in p
        for p in dockerfile_common_problems(
            "FROM python:3.12.11-slim AS a\nUSER 1000\nFROM python:3.12.11-slim\nUSER 0\n"
        )
    )
    assert dockerfile_common_problems("FROM python:3.12.11-slim\nUSER app\n") == []


def test_dockerignore_rule():
    allowlist = ["*", "!pyproject.toml", "!amid_ray/", "**/__pycache__"]
    assert not dockerignore_excludes(allowlist, "pyproject.toml")
    assert not dockerignore_excludes(allowlist, "amid_ray/cli.py")
    assert dockerignore_excludes(allowlist, "amid_ray/__pycache__/cli.pyc")
    assert dockerignore_excludes(allowlist, ".venv/bin/python")
    assert dockerignore_excludes(allowlist, "tune_amid.py")


def test_compose_variables_rule():
    compose = {
        "services": {
            "a": {"environment": {"A": "${NEEDED:?set it}", "B": "${PLAIN}", "C": "${OPTIONAL:-x}"}}
        }
    }
    assert compose_variables(compose) == {"NEEDED", "PLAIN"}


def test_filled_in_credentials_would_be_git_ignored():
    for path in (
        DEPLOY / "mlflow" / ".env",
        DEPLOY / "mlflow" / "client.env",
        KUBERAY / "secrets.yaml",
    ):
        assert _ignored_by_deploy_gitignore(path), rel(path)
    for path in (
        DEPLOY / "mlflow" / ".env.example",
        DEPLOY / "mlflow" / "client.env.example",
        KUBERAY / "secrets.example.yaml",
    ):
        assert not _ignored_by_deploy_gitignore(path), rel(path)


# =========================================================================== security
# Issue #13: Ray token authentication, NetworkPolicies, least-privilege pods (docs/SECURITY.md).

NETWORKPOLICY = KUBERAY / "networkpolicy.yaml"
SERVICEACCOUNTS = KUBERAY / "serviceaccounts.yaml"
MLFLOW_K8S = KUBERAY / "mlflow.yaml"
RAY_TOKEN_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName must hold
API_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
_RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


# --------------------------------------------------------------------------- pod security


def pod_specs(doc: Any) -> list[tuple[str, dict]]:
    """Every pod spec of a manifest (Deployment/Job templates, KubeRay groups, the RayJob
    submitter), with where it is."""
    return [
        (where, value)
        for where, key, value in walk(doc)
        if key == "spec" and isinstance(value, dict) and "containers" in value
    ]


def container_security_problems(container: dict, label: str) -> list[str]:
    """No privilege escalation, every capability dropped and none added, not privileged, not
    root, a read-only root file system, and CPU and memory limits."""
    security = container.get("securityContext") or {}
    capabilities = security.get("capabilities") or {}
    problems = []
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{label}: allowPrivilegeEscalation is not false")
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{label}: capabilities do not drop ALL")
    if capabilities.get("add"):
        problems.append(f"{label}: adds capabilities {capabilities['add']}")
    if security.get("privileged"):
        problems.append(f"{label}: privileged")
    if security.get("runAsUser") == 0 or security.get("runAsNonRoot") is False:
        problems.append(f"{label}: runs as root")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{label}: root file system is writable")
    limits = (container.get("resources") or {}).get("limits") or {}
    missing = sorted({"cpu", "memory"} - set(limits))
    if missing:
        problems.append(f"{label}: no {'/'.join(missing)} limit")
    return problems


def pod_security_problems(pod: dict, service_accounts: dict[str, bool]) -> list[str]:
    """Pod Security "restricted" (non-root, seccomp, no escalation, no capabilities) plus: no
    automatically mounted API token, a ServiceAccount of serviceaccounts.yaml that mounts none
    either, nothing from the node, and limits on every container (init containers included).
    `service_accounts`: name -> its automountServiceAccountToken."""
    security = pod.get("securityContext") or {}
    problems = []
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") == 0:
        problems.append("pod not forced to run as non-root")
    if (security.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("no seccomp profile (RuntimeDefault)")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    account = pod.get("serviceAccountName")
    if account not in service_accounts:
        problems.append(f"ServiceAccount {account!r} is not one of serviceaccounts.yaml")
    elif service_accounts[account] is not False:
        problems.append(f"ServiceAccount {account} mounts its token")
    problems += [f"{flag} is on" for flag in ("hostNetwork", "hostPID", "hostIPC") if pod.get(flag)]
    problems += [
        f"volume {v.get('name')} is a hostPath" for v in pod.get("volumes") or [] if "hostPath" in v
    ]
    for kind in ("initContainers", "containers"):
        for container in pod.get(kind) or []:
            problems += container_security_problems(container, f"container {container.get('name')}")
    return problems


def api_token_volumes(pod: dict) -> set[str]:
    return {
        volume["name"]
        for volume in pod.get("volumes") or []
        if any(
            "serviceAccountToken" in s for s in (volume.get("projected") or {}).get("sources", [])
        )
    }


def api_token_mount_problems(pod: dict) -> list[str]:
    """No container of the pod itself mounts a projected ServiceAccount token."""
    tokens = api_token_volumes(pod)
    return [
        f"container {container.get('name')} mounts the API token volume {mount['name']}"
        for kind in ("initContainers", "containers")
        for container in pod.get(kind) or []
        for mount in container.get("volumeMounts") or []
        if mount.get("name") in tokens
    ]


def autoscaler_problems(spec: dict) -> list[str]:
    """The autoscaler sidecar (injected by KubeRay from autoscalerOptions): hardened like the
    Ray containers, and where the head pod projects an API token, the one container to mount it
    (at the standard path, read-only)."""
    options = spec.get("autoscalerOptions") or {}
    problems = container_security_problems(options, "autoscaler")
    head = ((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
    for name in api_token_volumes(head):
        mounts = [m for m in options.get("volumeMounts") or [] if m.get("name") == name]
        if not any(m.get("mountPath") == API_TOKEN_PATH and m.get("readOnly") for m in mounts):
            problems.append(f"API token volume {name} not mounted read-only by the autoscaler")
    return problems


# --------------------------------------------------------------------------- Ray token


def container_token_problems(container: dict, secret: str | None) -> list[str]:
    """RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN from the Secret `secret` (key auth_token), not
    optional (a missing Secret must stop the pod, not start Ray without the token)."""
    env = {e.get("name"): e for e in container.get("env") or []}
    problems = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append("RAY_AUTH_MODE is not token")
    ref = ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if (ref.get("name"), ref.get("key")) != (secret, RAY_TOKEN_KEY):
        problems.append(f"RAY_AUTH_TOKEN does not come from Secret {secret}/{RAY_TOKEN_KEY}")
    elif ref.get("optional"):
        problems.append("RAY_AUTH_TOKEN is optional")
    return problems


def ray_auth_problems(spec: Any) -> list[str]:
    """A RayCluster spec with Ray token authentication: authOptions (mode token, our Secret, so
    the operator and the autoscaler use it too) and the token in every Ray container."""
    if not isinstance(spec, dict):
        return ["RayCluster spec missing"]
    auth = spec.get("authOptions") or {}
    problems = []
    if auth.get("mode") != "token":
        problems.append("authOptions.mode is not token")
    secret = auth.get("secretName")
    if not secret:
        problems.append("authOptions.secretName missing (the operator would make its own token)")
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [
        (f"worker group {g.get('groupName')}", g) for g in spec.get("workerGroupSpecs") or []
    ]
    for label, group in groups:
        container = _ray_container(group.get("template") or {})
        problems += [f"{label}: {p}" for p in container_token_problems(container, secret)]
    return problems


_HEX_64 = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
_TOKEN_ASSIGNMENT = re.compile(r"\b(RAY_AUTH_TOKEN|auth_token)\s*[=:]\s*(\S+)")


def plaintext_token_problems(text: str) -> list[str]:
    """A Ray token written out: a 64-hex-digit string (the shape of `secrets.token_hex(32)` and
    of `ray get-auth-token --generate`) not introduced as a sha256 digest, or RAY_AUTH_TOKEN /
    auth_token assigned anything but a placeholder or a $variable."""
    problems = [
        f"64-hex-digit string at {m.start()}"
        for m in _HEX_64.finditer(text)
        if not text[: m.start()].endswith("sha256:")
    ]
    for name, value in _TOKEN_ASSIGNMENT.findall(text):
        value = value.strip("'\"{},")
        if value and not value.startswith(("$", PLACEHOLDER)):
            problems.append(f"{name} set to {value[:4]}…")
    return problems


# --------------------------------------------------------------------------- NetworkPolicy


class Pod:
    """A pod as NetworkPolicies see it: its labels, its namespace and that namespace's labels."""

    def __init__(self, labels: dict, namespace: str = "amid", namespace_labels: dict | None = None):
        self.labels = labels
        self.namespace = namespace
        self.namespace_labels = {
            "kubernetes.io/metadata.name": namespace,
            **(namespace_labels or {}),
        }


def selector_matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector: every matchLabels pair and every matchExpressions term (In,
    NotIn, Exists, DoesNotExist) must hold; the empty selector matches every pod."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for term in selector.get("matchExpressions") or []:
        key, operator, values = term["key"], term["operator"], term.get("values") or []
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not holds:
            return False
    return True


def peer_matches(peer: dict, policy_namespace: str, source: Pod) -> bool:
    """A `from` peer: a podSelector alone means pods of the policy's namespace; with a
    namespaceSelector, pods of the matching namespaces (both selectors must hold)."""
    if "ipBlock" in peer:
        raise ValueError(f"ipBlock peers are not modelled: {peer}")
    if "namespaceSelector" in peer:
        in_namespace = selector_matches(peer["namespaceSelector"], source.namespace_labels)
    else:
        in_namespace = source.namespace == policy_namespace
    return in_namespace and selector_matches(peer.get("podSelector") or {}, source.labels)


def rule_admits_port(rule: dict, port: int) -> bool:
    """No `ports`: every port; otherwise a TCP entry whose port (..endPort) covers `port`."""
    entries = rule.get("ports")
    if not entries:
        return True
    for entry in entries:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        if not isinstance(entry["port"], int):
            raise ValueError(f"named ports are not modelled: {entry}")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def ingress_allowed(
    policies: list[dict], namespace: str, dest: Pod, port: int, source: Pod
) -> bool:
    """Whether NetworkPolicies `policies` (applied in `namespace`) let `source` open a TCP
    connection to `dest`:`port`. A pod that no policy selects for Ingress accepts everything;
    a selected pod accepts what at least one rule of a selecting policy admits (a rule without
    `from` admits every source)."""
    selecting = [
        policy
        for policy in policies
        if dest.namespace == namespace
        and selector_matches(policy["spec"]["podSelector"], dest.labels)
        and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    return any(
        rule_admits_port(rule, port)
        and (not rule.get("from") or any(peer_matches(p, namespace, source) for p in rule["from"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress") or []
    )


def kuberay_pod_labels(template: dict, node_type: str) -> dict:
    """The labels KubeRay gives a Ray pod: its own defaults, overridden by the template's
    (ray.io/node-type, group and cluster cannot be overridden; ours set none of them)."""
    defaults = {
        "ray.io/is-ray-node": "yes",
        "ray.io/node-type": node_type,
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    return {**defaults, **((template.get("metadata") or {}).get("labels") or {})}


NAMESPACE = "amid"  # where the manifests are applied; any name, the policies do not name it
RAY_PORTS = (6379, 8265, 10001, 10002, 19999, 8076, 52365, 45123)  # 45123: an NCCL port
MLFLOW_PORTS = (5000, 22, 8265)
EVERY = "every"


def network_pods(cluster_spec: dict, job: dict, mlflow: dict) -> dict[str, Pod]:
    head = cluster_spec["headGroupSpec"]["template"]
    worker = cluster_spec["workerGroupSpecs"][0]["template"]
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    server = mlflow["spec"]["template"]["metadata"]["labels"]
    dashboard_client = {"amid-ray/ray-dashboard-client": "true"}
    mlflow_client = {"amid-ray/mlflow-client": "true"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    return {
        "head": Pod(kuberay_pod_labels(head, "head")),
        "worker": Pod(kuberay_pod_labels(worker, "worker")),
        "submitter": Pod(submitter),
        "mlflow": Pod(server),
        "stranger": Pod({"app": "notebook"}),
        "operator": Pod(operator, "kuberay-system", {"amid-ray/kuberay-operator": "true"}),
        "operator, unlabelled namespace": Pod(operator, "kuberay-system"),
        "dashboard client elsewhere": Pod(dashboard_client, "ci", dashboard_client),
        "dashboard label, unlabelled namespace": Pod(dashboard_client, "ci"),
        "mlflow client": Pod(mlflow_client),
        "mlflow client elsewhere": Pod(mlflow_client, "notebooks", mlflow_client),
        "mlflow label, unlabelled namespace": Pod(mlflow_client, "notebooks"),
    }


# (source, destination) -> the ports that must be open; every other pair and port: closed.
EXPECTED_OPEN = {
    ("head", "head"): EVERY,
    ("worker", "head"): EVERY,
    ("head", "worker"): EVERY,
    ("worker", "worker"): EVERY,
    ("submitter", "head"): {8265},
    ("operator", "head"): {8265},
    ("dashboard client elsewhere", "head"): {8265},
    ("head", "mlflow"): {5000},
    ("worker", "mlflow"): {5000},
    ("mlflow client", "mlflow"): {5000},
    ("mlflow client elsewhere", "mlflow"): {5000},
}


def network_matrix_problems(policies: list[dict], pods: dict[str, Pod]) -> list[str]:
    """Every (source, destination, port) whose fate under `policies` differs from EXPECTED_OPEN."""
    problems = []
    for dest_name, ports in (("head", RAY_PORTS), ("worker", RAY_PORTS), ("mlflow", MLFLOW_PORTS)):
        for source_name, source in pods.items():
            expected = EXPECTED_OPEN.get((source_name, dest_name), set())
            expected = set(ports) if expected == EVERY else expected
            opened = {
                port
                for port in ports
                if ingress_allowed(policies, NAMESPACE, pods[dest_name], port, source)
            }
            if opened != expected:
                problems.append(
                    f"{source_name} -> {dest_name}: open {sorted(opened)}, "
                    f"expected {sorted(expected)}"
                )
    return problems


# --------------------------------------------------------------------------- launcher


def launcher_security_problems(cfg: dict) -> list[str]:
    """The cluster launcher's containers: no new privileges, no capabilities, not privileged,
    Ray token auth (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH to a file `ray up` copies)."""
    docker = cfg.get("docker") or {}
    options = [
        o
        for key in ("run_options", "head_run_options", "worker_run_options")
        for o in docker.get(key) or []
    ]
    tokens = shlex.split(" ".join(options))
    pairs = set(zip(tokens, tokens[1:], strict=False))
    env = dict(b.split("=", 1) for a, b in pairs if a in ("--env", "-e") and "=" in b)
    problems = []
    if ("--security-opt", "no-new-privileges") not in pairs:
        problems.append("docker run without --security-opt no-new-privileges")
    if ("--cap-drop", "ALL") not in pairs:
        problems.append("docker run without --cap-drop ALL")
    problems += [f"docker run with {t}" for t in tokens if t in ("--privileged", "--cap-add")]
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("RAY_AUTH_MODE=token is not set for the containers")
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    home = "/home/ray/"  # the image's HOME; file_mounts' ~/ lands there
    mounted = {str(dst).replace("~/", home, 1) for dst in (cfg.get("file_mounts") or {})}
    if token_path not in mounted:
        problems.append(f"RAY_AUTH_TOKEN_PATH {token_path!r} is not a file_mounts target")
    return problems


# =========================================================================== security: real files


def _service_accounts() -> dict[str, bool]:
    return {
        doc["metadata"]["name"]: doc.get("automountServiceAccountToken")
        for doc in load_docs(SERVICEACCOUNTS)
        if doc["kind"] == "ServiceAccount"
    }


def _all_pod_specs() -> list[tuple[str, dict]]:
    return [
        (f"{rel(path)} {where}", pod) for path, doc in k8s_docs() for where, pod in pod_specs(doc)
    ]


def test_every_pod_spec_is_found():
    # head + worker in raycluster.yaml; submitter + head + worker in rayjob.yaml; MLflow.
    found = sorted(where for where, _ in _all_pod_specs())
    assert len(found) == 6, found


@pytest.mark.parametrize("where,pod", _all_pod_specs(), ids=[w for w, _ in _all_pod_specs()])
def test_pod_runs_with_least_privilege(where, pod):
    assert pod_security_problems(pod, _service_accounts()) == []
    assert api_token_mount_problems(pod) == []


def test_service_accounts_mount_no_token_and_nothing_grants_them_rights():
    accounts = _service_accounts()
    assert set(accounts) == {
        "amid-ray-head",
        "amid-ray-worker",
        "amid-ray-submitter",
        "amid-mlflow",
    }
    assert all(flag is False for flag in accounts.values())
    assert [doc["kind"] for _, doc in k8s_docs() if doc["kind"] in _RBAC_KINDS] == []


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
def test_only_the_autoscaler_holds_an_api_token(path):
    doc = load_one(path)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    head = spec["headGroupSpec"]["template"]["spec"]
    assert api_token_volumes(head) == {"autoscaler-api-token"}
    assert autoscaler_problems(spec) == []
    # The KubeRay autoscaler Role is bound to the head's ServiceAccount.
    assert head["serviceAccountName"] == "amid-ray-head"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
def test_ray_token_auth_is_on(path):
    doc = load_one(path)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert ray_auth_problems(spec) == []
    # The Secret it names exists (as an example) with the key KubeRay reads.
    examples = {d["metadata"]["name"]: d for d in load_docs(KUBERAY / "secrets.example.yaml")}
    assert examples[spec["authOptions"]["secretName"]]["stringData"] == {RAY_TOKEN_KEY: PLACEHOLDER}
    # The token needs Ray >= 2.52 (KubeRay refuses authOptions below).
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)


def test_rayjob_submitter_has_the_token_and_may_reach_the_dashboard():
    job = load_one(RAYJOB)
    template = job["spec"]["submitterPodTemplate"]
    secret = job["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    assert container_token_problems(template["spec"]["containers"][0], secret) == []
    assert template["metadata"]["labels"]["amid-ray/ray-dashboard-client"] == "true"
    assert template["spec"]["restartPolicy"] == "Never"


def test_no_ray_token_anywhere_in_deploy():
    found = [
        f"{rel(path)}: {problem}"
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for problem in plaintext_token_problems(path.read_text())
    ]
    assert not found


def test_network_policies_are_plain_ingress_rules():
    policies = load_docs(NETWORKPOLICY)
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        for rule in policy["spec"]["ingress"]:
            for entry in rule.get("ports") or []:
                assert isinstance(entry["port"], int) and entry.get("protocol") == "TCP"


def _real_network_pods() -> dict[str, Pod]:
    # The RayJob's cluster has the RayCluster's spec (a test above), hence the same pod labels.
    mlflow = next(d for d in load_docs(MLFLOW_K8S) if d["kind"] == "Deployment")
    return network_pods(load_one(RAYCLUSTER)["spec"], load_one(RAYJOB), mlflow)


def test_network_policies_select_the_ray_pods_and_mlflow():
    policies = load_docs(NETWORKPOLICY)
    pods = _real_network_pods()
    for name in ("head", "worker", "mlflow"):
        assert any(selector_matches(p["spec"]["podSelector"], pods[name].labels) for p in policies)
    # Clients are not Ray pods: the submitter must not get Ray-to-Ray access by its labels.
    cluster_policy = next(p for p in policies if p["metadata"]["name"] == "amid-ray-cluster")
    assert not selector_matches(cluster_policy["spec"]["podSelector"], pods["submitter"].labels)


def test_network_policies_open_exactly_the_expected_ports():
    assert network_matrix_problems(load_docs(NETWORKPOLICY), _real_network_pods()) == []


def test_cluster_launcher_security():
    assert launcher_security_problems(load_one(LAUNCHER)) == []


def test_security_doc_names_the_trust_boundaries():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    for phrase in (
        "tuner.pkl",
        "weights_only=True",
        "safetensors",
        "--insecure",
        "redact_uri",
        "RAY_AUTH_MODE",
        "NetworkPolicy",
        "automountServiceAccountToken",
    ):
        assert phrase in text, phrase
    mentioned = set(re.findall(r"deploy/[\w./-]*\w", text))
    assert mentioned and all((ROOT / m).exists() for m in mentioned), mentioned


# =========================================================================== security: negatives


def _mutated(doc: dict, change) -> dict:
    copied = copy.deepcopy(doc)
    change(copied)
    return copied


def _head_pod(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]


def _head_container(spec: dict) -> dict:
    return _head_pod(spec)["containers"][0]


@pytest.mark.parametrize(
    "label,change,expect",
    [
        ("root user", lambda p: p["securityContext"].update(runAsUser=0), "non-root"),
        ("no runAsNonRoot", lambda p: p["securityContext"].pop("runAsNonRoot"), "non-root"),
        ("no seccomp", lambda p: p["securityContext"].pop("seccompProfile"), "seccomp"),
        ("token mounted", lambda p: p.update(automountServiceAccountToken=True), "automount"),
        ("no token setting", lambda p: p.pop("automountServiceAccountToken"), "automount"),
        ("default account", lambda p: p.pop("serviceAccountName"), "ServiceAccount"),
        ("host network", lambda p: p.update(hostNetwork=True), "hostNetwork"),
        (
            "hostPath",
            lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            "hostPath",
        ),
        (
            "escalation",
            lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
            "allowPrivilegeEscalation",
        ),
        (
            "capabilities kept",
            lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
            "drop ALL",
        ),
        (
            "capability added",
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
                add=["NET_ADMIN"]
            ),
            "adds capabilities",
        ),
        (
            "privileged",
            lambda p: p["containers"][0]["securityContext"].update(privileged=True),
            "privileged",
        ),
        (
            "writable root",
            lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
            "writable",
        ),
        (
            "no memory limit",
            lambda p: p["containers"][0]["resources"]["limits"].pop("memory"),
            "memory limit",
        ),
        (
            "unhardened init container",
            lambda p: p.update(initContainers=[{"name": "init", "image": "x:1.0"}]),
            "container init",
        ),
    ],
)
def test_pod_security_checker_flags(label, change, expect):
    good = _head_pod(load_one(RAYCLUSTER)["spec"])
    assert pod_security_problems(good, _service_accounts()) == []
    problems = pod_security_problems(_mutated(good, change), _service_accounts())
    assert any(expect in p for p in problems), (label, problems)
    # A ServiceAccount that mounts its own token is refused as well.
    assert any(
        "mounts its token" in p
        for p in pod_security_problems(good, {**_service_accounts(), "amid-ray-head": True})
    )


def test_api_token_checkers_flag():
    spec = load_one(RAYCLUSTER)["spec"]
    mount = {"name": "autoscaler-api-token", "mountPath": API_TOKEN_PATH, "readOnly": True}
    in_ray_container = _mutated(
        _head_pod(spec), lambda p: p["containers"][0]["volumeMounts"].append(mount)
    )
    assert any("ray-head" in p for p in api_token_mount_problems(in_ray_container))
    unmounted = _mutated(spec, lambda s: s["autoscalerOptions"].update(volumeMounts=[]))
    assert any("autoscaler-api-token" in p for p in autoscaler_problems(unmounted))
    writable = _mutated(spec, lambda s: s["autoscalerOptions"]["volumeMounts"][0].pop("readOnly"))
    assert any("read-only" in p for p in autoscaler_problems(writable))
    loose = _mutated(spec, lambda s: s["autoscalerOptions"].pop("securityContext"))
    assert any("allowPrivilegeEscalation" in p for p in autoscaler_problems(loose))


def _token_env(spec: dict) -> dict:
    return next(e for e in _head_container(spec)["env"] if e["name"] == "RAY_AUTH_TOKEN")


@pytest.mark.parametrize(
    "label,change,expect",
    [
        ("auth disabled", lambda s: s["authOptions"].update(mode="disabled"), "mode"),
        ("no authOptions", lambda s: s.pop("authOptions"), "mode"),
        ("operator's own token", lambda s: s["authOptions"].pop("secretName"), "secretName"),
        (
            "mode off in the head",
            lambda s: _head_container(s)["env"].__setitem__(
                0, {"name": "RAY_AUTH_MODE", "value": "disabled"}
            ),
            "RAY_AUTH_MODE",
        ),
        (
            "token inline",
            lambda s: _token_env(s).update(value="0" * 64) or _token_env(s).pop("valueFrom"),
            "RAY_AUTH_TOKEN",
        ),
        (
            "token from another Secret",
            lambda s: _token_env(s)["valueFrom"]["secretKeyRef"].update(name="amid-ray-secrets"),
            "RAY_AUTH_TOKEN",
        ),
        (
            "token optional",
            lambda s: _token_env(s)["valueFrom"]["secretKeyRef"].update(optional=True),
            "optional",
        ),
        (
            "worker without token",
            lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(env=[]),
            "worker group gpu",
        ),
    ],
)
def test_ray_auth_checker_flags(label, change, expect):
    good = load_one(RAYCLUSTER)["spec"]
    assert ray_auth_problems(good) == []
    # YAML anchors make head and worker share one env list: mutate a copy of the whole spec.
    problems = ray_auth_problems(_mutated(good, change))
    assert any(expect in p for p in problems), (label, problems)


@pytest.mark.parametrize(
    "text,flagged",
    [
        ("auth_token: " + "3f" * 32, True),
        ('auth_token: "REPLACE_ME"', False),
        ("RAY_AUTH_TOKEN=hunter2 ray start", True),
        ("RAY_AUTH_TOKEN=$(cat ~/.amid/ray_auth_token)", False),
        ("--env RAY_AUTH_TOKEN_PATH=/home/ray/.amid/ray_auth_token", False),
        ("--from-literal=auth_token=s3cr3t", True),
        ('--from-literal=auth_token="$(python3 -c ...)"', False),
        ("secretKeyRef: {name: amid-ray-auth, key: auth_token}", False),
        ("image@sha256:" + "a" * 64, False),
        ("echo " + "A" * 64, True),
    ],
)
def test_plaintext_token_rule(text, flagged):
    assert bool(plaintext_token_problems(text)) is flagged, plaintext_token_problems(text)


def test_selector_semantics():
    labels = {"app": "a", "tier": "x"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"app": "a"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "b"}}, labels)
    for operator, values, holds in (
        ("In", ["x", "y"], True),
        ("In", ["y"], False),
        ("NotIn", ["y"], True),
        ("NotIn", ["x"], False),
        ("Exists", [], True),
        ("DoesNotExist", [], False),
    ):
        term = {"key": "tier", "operator": operator, "values": values}
        assert selector_matches({"matchExpressions": [term]}, labels) is holds, operator
    assert selector_matches(
        {"matchExpressions": [{"key": "gone", "operator": "NotIn", "values": ["x"]}]}, labels
    )


def test_ingress_semantics():
    def policy(ingress, selector=None, types=("Ingress",)):
        spec = {"podSelector": selector or {"matchLabels": {"app": "db"}}, "ingress": ingress}
        return {"spec": {**spec, "policyTypes": list(types)}}

    db, web = Pod({"app": "db"}), Pod({"app": "web"})
    web_elsewhere = Pod({"app": "web"}, "other", {"team": "blue"})
    web_peer = {"podSelector": {"matchLabels": {"app": "web"}}}
    blue = {"namespaceSelector": {"matchLabels": {"team": "blue"}}}

    def allowed(policies, source, port=5432):
        return ingress_allowed(policies, NAMESPACE, db, port, source)

    assert allowed([], web)  # no policy: not isolated
    assert allowed([policy([], selector={"matchLabels": {"app": "other"}})], web)
    assert allowed([policy([], types=("Egress",))], web)  # egress-only: ingress open
    assert not allowed([policy([])], web)  # selected, no rule: closed
    assert allowed([policy([{}])], web_elsewhere)  # a rule without from: every source
    assert allowed([policy([{"from": [web_peer]}])], web)
    assert not allowed([policy([{"from": [web_peer]}])], web_elsewhere)  # podSelector: own ns
    assert allowed([policy([{"from": [blue]}])], web_elsewhere)
    assert not allowed(
        [policy([{"from": [{**blue, **web_peer}]}])], Pod({"app": "x"}, "other", {"team": "blue"})
    )
    assert allowed(
        [policy([{"from": [blue, web_peer]}])], Pod({"app": "x"}, "other", {"team": "blue"})
    )  # OR of peers
    ranged = policy([{"ports": [{"protocol": "TCP", "port": 5000, "endPort": 5010}]}])
    assert allowed([ranged], web, 5005) and not allowed([ranged], web, 5011)
    udp = policy([{"ports": [{"protocol": "UDP", "port": 5432}]}])
    assert not allowed([udp], web)
    # Two policies on one pod: the union of what they admit.
    one = policy([{"from": [web_peer], "ports": [{"protocol": "TCP", "port": 1}]}])
    two = policy([{"from": [web_peer], "ports": [{"protocol": "TCP", "port": 2}]}])
    assert allowed([one, two], web, 1) and allowed([one, two], web, 2)
    assert not allowed([one, two], web, 3)
    with pytest.raises(ValueError):
        allowed([policy([{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}])], web)


def _policy(policies: list[dict], name: str) -> dict:
    return next(p for p in policies if p["metadata"]["name"] == name)


@pytest.mark.parametrize(
    "label,change_policies,change_cluster,expect",
    [
        (
            "dashboard rule without ports",
            lambda ps: _policy(ps, "amid-ray-dashboard")["spec"]["ingress"][0].pop("ports"),
            None,
            "submitter -> head",
        ),
        (
            "Ray ports open to the namespace",
            lambda ps: _policy(ps, "amid-ray-cluster")["spec"]["ingress"][0].update(
                {"from": [{"podSelector": {}}]}
            ),
            None,
            "stranger -> head",
        ),
        (
            "operator from any namespace",
            lambda ps: _policy(ps, "amid-ray-dashboard")["spec"]["ingress"][0]["from"][2].update(
                namespaceSelector={}
            ),
            None,
            "operator, unlabelled namespace -> head",
        ),
        (
            "no MLflow policy",
            lambda ps: ps.remove(_policy(ps, "amid-mlflow")),
            None,
            "stranger -> mlflow",
        ),
        (
            "Ray pods lose their label",
            None,
            lambda s: s["headGroupSpec"]["template"]["metadata"]["labels"].pop(
                "app.kubernetes.io/name"
            ),
            "-> head",
        ),
    ],
)
def test_network_matrix_flags(label, change_policies, change_cluster, expect):
    policies = load_docs(NETWORKPOLICY)
    cluster = load_one(RAYCLUSTER)["spec"]
    if change_policies:
        change_policies(policies)
    if change_cluster:
        change_cluster(cluster)
    mlflow = next(d for d in load_docs(MLFLOW_K8S) if d["kind"] == "Deployment")
    problems = network_matrix_problems(policies, network_pods(cluster, load_one(RAYJOB), mlflow))
    assert any(expect in p for p in problems), (label, problems)


def test_launcher_security_checker_flags():
    good = load_one(LAUNCHER)

    def options_without(option):
        return lambda c: c["docker"].update(
            run_options=[o for o in c["docker"]["run_options"] if o != option]
        )

    cases = [
        (options_without("--security-opt no-new-privileges"), "no-new-privileges"),
        (options_without("--cap-drop ALL"), "--cap-drop ALL"),
        (lambda c: c["docker"]["run_options"].append("--privileged"), "--privileged"),
        (lambda c: c["docker"]["run_options"].append("--cap-add SYS_ADMIN"), "--cap-add"),
        (options_without("--env RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
        (lambda c: c["file_mounts"].pop("~/.amid/ray_auth_token"), "RAY_AUTH_TOKEN_PATH"),
    ]
    for change, expect in cases:
        problems = launcher_security_problems(_mutated(good, change))
        assert any(expect in p for p in problems), (expect, problems)
