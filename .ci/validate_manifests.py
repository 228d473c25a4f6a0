"""Validate the Kubernetes manifests under infra/k8s offline: `make lint` runs it.

`python .ci/validate_manifests.py [K8S_DIR]` builds the base and every overlay the way
kustomize does for the features they use, and no others (resources, JSON 6902 patches with
a kind/name target, and `labels` pairs added to every resource's metadata), refusing any
other kustomization field rather than ignoring it. `kubectl kustomize` was not available
where this was written. Each built resource is then checked: the built-in kinds by
kubernetes-validate against Kubernetes `KUBERNETES_VERSION`'s schemas in strict mode (an
unknown field is an error), and KEDA's ScaledObject against infra/k8s/scaledobject.schema.json.
It prints one line per build, and exits 1 naming each resource that fails and why.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.37.0"
_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "labels"}

Resource = dict[str, Any]


class BuildError(Exception):
    """A kustomization this script cannot build as kustomize would."""


def build(directory: Path) -> list[Resource]:
    """The resources of the kustomization in `directory`, its patches and labels applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise BuildError(f"{directory}: fields this build does not apply: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += build(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        _patch(directory, resources, patch)
    for labels in kustomization.get("labels", []):
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
    return resources


def _patch(directory: Path, resources: list[Resource], patch: dict[str, Any]) -> None:
    target = patch["target"]
    matched = [
        r
        for r in resources
        if r.get("kind") == target["kind"] and r.get("metadata", {}).get("name") == target["name"]
    ]
    if not matched:
        raise BuildError(f"{directory}: a patch targets {target}, which no resource is")
    for resource in matched:
        for operation in yaml.safe_load(patch["patch"]):
            _apply(resource, operation)


def _apply(resource: Resource, operation: dict[str, Any]) -> None:
    """One JSON 6902 `add`, `replace` or `remove`."""
    *parents, last = [_unescape(part) for part in operation["path"].split("/")[1:]]
    node: Any = resource
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            node[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del node[index]
        else:
            raise BuildError(f"unsupported patch op {op!r}")
        return
    if op == "replace" and last not in node:
        raise BuildError(f"replace of {operation['path']}, which does not exist")
    if op in ("add", "replace"):
        node[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del node[last]
    else:
        raise BuildError(f"unsupported patch op {op!r}")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def problems(resource: Resource, scaled_object_schema: dict[str, Any]) -> list[str]:
    """What is wrong with one built resource; empty when it is valid."""
    if resource.get("kind") == "ScaledObject":
        validator = jsonschema.Draft202012Validator(scaled_object_schema)
        return [
            f"{'/'.join(map(str, error.absolute_path)) or '.'}: {error.message}"
            for error in validator.iter_errors(resource)
        ]
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.path)) or '.'}: {error.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return [f"no schema to check it against: {e}"]
    return []


def main(k8s_dir: Path) -> int:
    schema = json.loads((k8s_dir / "scaledobject.schema.json").read_text())
    builds = [k8s_dir / "base", *sorted((k8s_dir / "overlays").iterdir())]
    failed = False
    for directory in builds:
        name = directory.relative_to(k8s_dir)
        try:
            resources = build(directory)
        except (BuildError, KeyError, IndexError, ValueError, yaml.YAMLError) as error:
            print(f"{name}: cannot build: {error}")
            failed = True
            continue
        for resource in resources:
            what = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
            for problem in problems(resource, schema):
                print(f"{name}: {what}: {problem}")
                failed = True
        print(f"{name}: {len(resources)} resources checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "infra" / "k8s"))
