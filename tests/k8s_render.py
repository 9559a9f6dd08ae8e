"""Render the kustomize trees in deploy/k8s into plain Kubernetes objects, for the manifest tests.

Two ways, same result:

* ``kubectl kustomize DIR`` (or ``kustomize build DIR``) when one is on PATH. kustomize itself is
  on neither PyPI nor Debian; this project's machine image happens to carry a kubectl with the
  built-in kustomize, and every developer with a cluster has one.
* Otherwise :func:`render_fallback`: a small renderer written for these tests that implements
  exactly the kustomize features deploy/k8s uses, and refuses any other field rather than guess:
  ``resources`` (files and kustomization folders), ``components`` (kind Component, applied to what
  the including kustomization has accumulated so far), ``configMapGenerator`` (literals and files;
  behavior create/merge; options labels, annotations and disableNameSuffixHash; the name-hash suffix
  computed as kustomize's hasher does, and the references in pod specs renamed), ``patches`` (by ``path``: a strategic-merge patch on the object its kind and
  metadata.name name), ``images`` (newName/newTag) and ``namespace``.

When kubectl is present, ``test_fallback_renderer_matches_kustomize`` proves the two agree object
for object on every overlay, so the fallback cannot drift silently from the real tool.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "configMapGenerator",
                         "patches", "images"}
_GENERATOR_FIELDS = {"name", "literals", "files", "behavior", "options"}
_GENERATOR_OPTIONS = {"labels", "annotations", "disableNameSuffixHash"}
# Kinds without a namespace (kustomize's namespace transformer leaves them alone).
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                   "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass"}
# Strategic merge: the lists of built-in objects that merge item by item, and their merge key.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
               "env": "name", "imagePullSecrets": "name"}
_BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2",
                   "rbac.authorization.k8s.io/v1"}


class RenderError(Exception):
    pass


def kustomize_command() -> list[str] | None:
    """The real kustomize available here: ``kustomize build`` or ``kubectl kustomize``, else None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.lru_cache(maxsize=None)
def _render_cached(path: str) -> str:
    command = kustomize_command()
    if command is None:
        return json.dumps(render_fallback(Path(path)))
    done = subprocess.run([*command, path], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RenderError(f"{' '.join(command)} {path} failed: {done.stderr.strip()}")
    return json.dumps([d for d in yaml.safe_load_all(done.stdout) if d])


def render(path: Path | str) -> list[dict[str, Any]]:
    """Every object of the kustomization at ``path``, rendered by the real kustomize if there is one."""
    return json.loads(_render_cached(str(Path(path).resolve())))


def renderer_name() -> str:
    command = kustomize_command()
    return " ".join(command) if command else "the fallback renderer in tests/k8s_render.py"


# --- the fallback renderer ---------------------------------------------------------------------------

class _Resource:
    def __init__(self, obj: dict[str, Any], generated: bool = False, hashed: bool = True) -> None:
        self.obj = obj
        self.generated = generated
        self.hashed = hashed            # a generated ConfigMap's name gets kustomize's hash suffix

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [d for d in yaml.safe_load_all(handle) if d]


def _load_kustomization(folder: Path) -> dict[str, Any]:
    file = folder / "kustomization.yaml"
    if not file.is_file():
        raise RenderError(f"{folder} has no kustomization.yaml")
    k = yaml.safe_load(file.read_text()) or {}
    unknown = set(k) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{file}: field(s) {sorted(unknown)} are not implemented by the fallback renderer")
    if k.get("kind", "Kustomization") not in {"Kustomization", "Component"}:
        raise RenderError(f"{file}: unknown kind {k.get('kind')!r}")
    return k


def _accumulate(folder: Path, resources: list[_Resource], as_component: bool) -> list[_Resource]:
    k = _load_kustomization(folder)
    if as_component != (k.get("kind") == "Component"):
        raise RenderError(f"{folder}: a Component must be listed under components, a Kustomization under resources")
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources.extend(_accumulate(path, [], as_component=False))
        else:
            resources.extend(_Resource(obj) for obj in _load_yaml_documents(path))
    for entry in k.get("components", []):
        resources = _accumulate((folder / entry).resolve(), resources, as_component=True)
    for generator in k.get("configMapGenerator", []):
        _generate_config_map(generator, resources, folder)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{folder}: only `patches: - path: FILE` is implemented by the fallback renderer")
        for document in _load_yaml_documents(folder / patch["path"]):
            _apply_patch(document, resources, folder)
    for image in k.get("images", []):
        _set_image(image, resources)
    if "namespace" in k:
        for resource in resources:
            if resource.kind not in _CLUSTER_SCOPED:
                resource.obj["metadata"]["namespace"] = k["namespace"]
    return resources


def _generate_config_map(generator: dict[str, Any], resources: list[_Resource], folder: Path) -> None:
    unknown = set(generator) - _GENERATOR_FIELDS
    if unknown:
        raise RenderError(f"{folder}: configMapGenerator field(s) {sorted(unknown)} are not implemented")
    options = generator.get("options", {})
    unknown = set(options) - _GENERATOR_OPTIONS
    if unknown:
        raise RenderError(f"{folder}: configMapGenerator option(s) {sorted(unknown)} are not implemented")
    data = {}
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in generator.get("files", []):        # "PATH" (the key is its file name) or "KEY=PATH"
        key, _, path = entry.rpartition("=")
        file = (folder / path).resolve()
        if not file.is_relative_to(folder):
            raise RenderError(f"{folder}: {path} is outside the kustomization (kustomize refuses it)")
        data[key or file.name] = file.read_text()
    behavior = generator.get("behavior", "create")
    existing = [r for r in resources if r.generated and r.kind == "ConfigMap" and r.name == generator["name"]]
    if behavior == "create":
        if existing:
            raise RenderError(f"{folder}: ConfigMap {generator['name']} generated twice (use behavior: merge)")
        metadata: dict[str, Any] = {"name": generator["name"]}
        for field in ("labels", "annotations"):
            if options.get(field):
                metadata[field] = {k: str(v) for k, v in options[field].items()}
        resources.append(_Resource({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data},
                                   generated=True, hashed=not options.get("disableNameSuffixHash", False)))
    elif behavior in {"merge", "replace"}:
        if options:
            raise RenderError(f"{folder}: options on a {behavior} of ConfigMap {generator['name']} are not implemented")
        if not existing:
            raise RenderError(f"{folder}: behavior {behavior} for ConfigMap {generator['name']}, which no base generates")
        if behavior == "replace":
            existing[0].obj["data"] = {}
        existing[0].obj["data"].update(data)
    else:
        raise RenderError(f"{folder}: unknown configMapGenerator behavior {behavior!r}")


def _apply_patch(patch: dict[str, Any], resources: list[_Resource], folder: Path) -> None:
    kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
    targets = [r for r in resources if r.kind == kind and r.name == name]
    if len(targets) != 1:
        raise RenderError(f"{folder}: patch for {kind}/{name} matches {len(targets)} objects, expected one")
    strategic = patch.get("apiVersion") in _BUILTIN_GROUPS
    targets[0].obj = _merge(targets[0].obj, patch, strategic)


def _merge(original: Any, patch: Any, strategic: bool, field: str = "") -> Any:
    """Strategic merge patch (built-in kinds) or JSON merge patch (others): maps merge key by key,
    ``null`` deletes a key; lists with a merge key merge item by item (new items first, as
    kustomize writes them); other lists are replaced."""
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = dict(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, strategic, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if strategic and isinstance(original, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        by_key = {item[key]: item for item in patch}
        fresh = [copy.deepcopy(item) for item in patch if item[key] not in {o[key] for o in original}]
        kept = [_merge(item, by_key[item[key]], strategic) if item[key] in by_key else item for item in original]
        return fresh + kept
    return copy.deepcopy(patch)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [obj["spec"]["template"]["spec"]]
    return []


def _set_image(image: dict[str, Any], resources: list[_Resource]) -> None:
    for resource in resources:
        for spec in _pod_specs(resource.obj):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                reference = container["image"]
                repository, _, tag = reference.rpartition(":") if ":" in reference.split("/")[-1] else (reference, "", "")
                if repository == image["name"]:
                    container["image"] = f"{image.get('newName', repository)}:{image.get('newTag', tag)}"


def config_map_hash(config_map: dict[str, Any]) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher/hasher.go): sha256 of the JSON of
    {data, kind, name} with sorted keys, where ``name`` is always "" (the hasher looks up the path
    "metadata/name" as one field name and so never finds it), first 10 hex digits with 0 1 3 a e
    replaced by g h k m t. Go's json.Marshal escapes <, > and & as \\u003c, \\u003e, \\u0026."""
    encoded = json.dumps({"data": config_map.get("data", {}), "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _rename_config_maps(resources: list[_Resource]) -> None:
    renamed: dict[tuple[str | None, str], str] = {}
    for resource in resources:
        if resource.generated and resource.hashed:
            old = resource.name
            resource.obj["metadata"]["name"] = f"{old}-{config_map_hash(resource.obj)}"
            renamed[(resource.obj["metadata"].get("namespace"), old)] = resource.obj["metadata"]["name"]

    def new_name(namespace: str | None, name: str) -> str:
        return renamed.get((namespace, name), name)

    for resource in resources:
        namespace = resource.obj["metadata"].get("namespace")
        for spec in _pod_specs(resource.obj):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        source["configMapRef"]["name"] = new_name(namespace, source["configMapRef"]["name"])
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        ref["name"] = new_name(namespace, ref["name"])
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    volume["configMap"]["name"] = new_name(namespace, volume["configMap"]["name"])


def render_fallback(folder: Path) -> list[dict[str, Any]]:
    """Render the kustomization in ``folder`` without kustomize (see the module's docstring)."""
    resources = _accumulate(Path(folder).resolve(), [], as_component=False)
    _rename_config_maps(resources)
    return [r.obj for r in resources]
