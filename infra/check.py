"""Check the cluster manifests without a cluster: `python -m infra.check` (CI runs it
through tests/test_infra.py). Prints each problem and exits 1 if there is any.

- Kubernetes objects (infra/k8s/*.yaml) against Kubernetes' own JSON schemas, strict
  (unknown fields fail), from the kubernetes-validate package.
- KubeRay RayCluster/RayJob against infra/schemas/kuberay-v1.schema.json, and every pod
  template in them against Kubernetes' PodTemplateSpec schema.
- The Ray cluster launcher config (infra/ray/*.yaml) as `ray up` prepares it before
  creating anything: defaults filled in, Ray's ray-schema.json, and each node type's
  node_config against EC2's RunInstances request (botocore's service model).
- Consistency: Ray and image versions agree with pyproject.toml, GPU pods run the GPU
  image, every Ray pod mounts the shared volume, the RayJob's entrypoint config loads.

Not checked here: building the images, admission by a real API server (defaults,
webhooks, quotas, whether the storage class and instance types exist), AWS itself.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
K8S_VERSION = "1.33"
IMAGE = re.compile(r"^(?P<registry>.+)/illada-(?P<kind>gpu|cpu|mlflow):(?P<tag>[^:/]+)$")
SHARED = "/mnt/shared"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned(name: str) -> str:
    """The version pyproject.toml pins `name` to, in the dependencies or any extra."""
    project = pyproject()
    for dep in [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values() for d in extra)]:
        if re.split(r"[\[=<>]", dep, 1)[0] == name:
            return dep.split("==", 1)[1]
    raise KeyError(name)


def documents(folder: Path = INFRA / "k8s") -> list[tuple[str, dict]]:
    out = []
    for path in sorted(folder.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.relative_to(REPO)}#{i}", doc))
    return out


# --- Kubernetes and KubeRay -----------------------------------------------------------------


def _k8s_validator(kind_file: str):
    """A validator for one of Kubernetes' schemas (strict), e.g. 'podtemplatespec-v1'."""
    import jsonschema
    from kubernetes_validate.utils import all_versions, major_minor, schema_contents
    from referencing import Registry, Resource

    version = [v for v in all_versions() if major_minor(v) <= K8S_VERSION][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{folder}/{kind_file}.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in sorted(validator.iter_errors(doc), key=str)]


def kuberay_schema(kind: str):
    """A validator for one KubeRay kind (validating against the kind's own definition, not
    the file's oneOf, gives errors that name the field)."""
    import jsonschema

    schema = json.loads((INFRA / "schemas" / "kuberay-v1.schema.json").read_text())
    if kind not in schema["$defs"]:
        raise KeyError(f"no KubeRay schema for kind {kind}")
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"})


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template of a RayCluster or RayJob, by where it is."""
    spec = doc.get("spec", {})
    cluster, prefix = (spec.get("rayClusterSpec", {}), "spec.rayClusterSpec") if doc["kind"] == "RayJob" else (spec, "spec")
    out = {}
    if "template" in cluster.get("headGroupSpec", {}):
        out[f"{prefix}.headGroupSpec.template"] = cluster["headGroupSpec"]["template"]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        if "template" in group:
            out[f"{prefix}.workerGroupSpecs.{i}.template"] = group["template"]
    if "submitterPodTemplate" in spec:
        out["spec.submitterPodTemplate"] = spec["submitterPodTemplate"]
    return out


def check_k8s(doc: dict) -> list[str]:
    """Schema problems of one manifest document."""
    if doc.get("apiVersion") == "ray.io/v1":
        try:
            problems = _errors(kuberay_schema(doc.get("kind", "")), doc)
        except KeyError as e:
            return [str(e)]
        templates = _k8s_validator("podtemplatespec-v1")
        for where, template in pod_templates(doc).items():
            problems += [f"{where}.{p}" for p in _errors(templates, template)]
        return problems
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def check_ray_pods(doc: dict) -> list[str]:
    """What illada needs of the pods of a RayCluster/RayJob."""
    problems = []
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"]) if doc["kind"] == "RayJob" else doc["spec"]
    if cluster.get("rayVersion") != pinned("ray"):
        problems.append(f"rayVersion {cluster.get('rayVersion')!r} is not pyproject.toml's ray {pinned('ray')}")
    for where, template in pod_templates(doc).items():
        if where == "spec.submitterPodTemplate":
            continue
        pod = template.get("spec", {})
        container = (pod.get("containers") or [{}])[0]  # the Ray container comes first
        limits = container.get("resources", {}).get("limits", {})
        image = IMAGE.match(container.get("image", ""))
        if image is None:
            problems.append(f"{where}: image {container.get('image')!r} is not an illada image (REGISTRY/illada-gpu|cpu:TAG)")
        elif ("nvidia.com/gpu" in limits) != (image["kind"] == "gpu"):
            problems.append(f"{where}: illada-{image['kind']} with GPU limit {limits.get('nvidia.com/gpu')}: GPU pods run illada-gpu, others illada-cpu")
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        if claims.get(mounts.get(SHARED)) != "illada-shared":
            problems.append(f"{where}: does not mount the illada-shared volume at {SHARED} (checkpoints must be on a filesystem every node sees)")
    return problems


def check_rayjob_entrypoint(doc: dict) -> list[str]:
    """The RayJob runs pipelines.pretrain with a config the image holds, and it loads."""
    from illada.config import ConfigError, load_config

    argv = shlex.split(doc["spec"].get("entrypoint", ""))
    if argv[:3] != ["python", "-m", "pipelines.pretrain"] or len(argv) < 4:
        return [f"entrypoint {doc['spec'].get('entrypoint')!r} is not `python -m pipelines.pretrain CONFIG [key=value ...]`"]
    config = argv[3]
    if not config.startswith("/opt/illada/"):
        return [f"entrypoint config {config} is not in the image (/opt/illada/...)"]
    try:
        load_config(REPO / config.removeprefix("/opt/illada/"), argv[4:]).require("model", "train")
    except ConfigError as e:
        return [f"entrypoint config: {e}"]
    return []


# --- the cluster launcher ---------------------------------------------------------------------


def check_launcher(path: Path) -> list[str]:
    """`ray up`'s preparation of the config, without creating anything."""
    import botocore.session
    import jsonschema
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    try:
        config = prepare_config(raw)
        validate_config(config)
    except (jsonschema.ValidationError, ValueError, KeyError) as e:
        return [f"ray up would refuse it: {getattr(e, 'message', e)}"]
    problems = []
    if config["provider"]["type"] == "aws":
        run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
        for name, node_type in config["available_node_types"].items():
            report = ParamValidator().validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances)
            if report.has_errors():
                problems.append(f"node type {name}: node_config is not an EC2 RunInstances request: {report.generate_report()}")
    images = [config["docker"].get("image", "")] + [t.get("docker", {}).get("worker_image", "") for t in config["available_node_types"].values()]
    for image in filter(None, images):
        if not IMAGE.match(image):
            problems.append(f"docker image {image!r} is not an illada image")
    for name, node_type in config["available_node_types"].items():
        gpus = node_type["resources"].get("GPU", 0)
        image = node_type.get("docker", {}).get("worker_image", config["docker"].get("image", ""))
        if bool(gpus) != ("illada-gpu" in image):
            problems.append(f"node type {name}: {gpus} GPUs with image {image}: GPU nodes run illada-gpu, others illada-cpu")
    return problems


# --- images -----------------------------------------------------------------------------------


def dockerfile_args(name: str) -> dict[str, str]:
    text = (INFRA / "docker" / f"{name}.Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def check_images(texts: list[str]) -> list[str]:
    """Every illada image named anywhere has a Dockerfile and the project's version as its
    tag; the images that join one Ray cluster have the same Python."""
    problems = []
    version = pyproject()["version"]
    for text in texts:
        for image in re.findall(r"\S+/illada-\w+:[^\s\"',}]+", text):
            m = IMAGE.match(image)
            if not m:
                problems.append(f"image {image!r}: not REGISTRY/illada-gpu|cpu|mlflow:TAG")
            elif m["tag"] != version:
                problems.append(f"image {image}: tag {m['tag']} is not the project's version {version}")
            elif not (INFRA / "docker" / f"{m['kind']}.Dockerfile").exists():
                problems.append(f"image {image}: no infra/docker/{m['kind']}.Dockerfile builds it")
    gpu, cpu = dockerfile_args("gpu").get("PYTHON_MINOR"), dockerfile_args("cpu").get("PYTHON_MINOR")
    if gpu is None or gpu != cpu:
        problems.append(f"gpu.Dockerfile's PYTHON_MINOR ({gpu}) and cpu.Dockerfile's ({cpu}) differ: Ray needs one Python per cluster")
    for name in ("gpu", "cpu", "mlflow"):
        for base in re.findall(r"^FROM (\S+)", (INFRA / "docker" / f"{name}.Dockerfile").read_text(), re.MULTILINE):
            if ":" not in base or base.endswith(":latest"):
                problems.append(f"{name}.Dockerfile: base image {base} has no pinned tag")
    return problems


# --- all of it --------------------------------------------------------------------------------


def check_all() -> list[str]:
    problems = []
    for where, doc in documents():
        problems += [f"{where} ({doc.get('kind')}): {p}" for p in check_k8s(doc)]
        if doc.get("apiVersion") == "ray.io/v1":
            problems += [f"{where} ({doc['kind']}): {p}" for p in check_ray_pods(doc)]
        if doc.get("kind") == "RayJob":
            problems += [f"{where} (RayJob): {p}" for p in check_rayjob_entrypoint(doc)]
    for path in sorted((INFRA / "ray").glob("*.yaml")):
        problems += [f"{path.relative_to(REPO)}: {p}" for p in check_launcher(path)]
    texts = [p.read_text() for p in sorted(INFRA.glob("*/*.yaml"))]
    problems += check_images(texts)
    return problems


def main() -> int:
    problems = check_all()
    for p in problems:
        print(p)
    print(f"infra: {len(problems)} problem(s)" if problems else "infra: every manifest checks out")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
