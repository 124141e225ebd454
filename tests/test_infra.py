"""The cluster manifests (infra/) check out, and each kind of mistake in them is caught:
Kubernetes' and KubeRay's schemas, `ray up`'s preparation of the launcher config, EC2's
request shape, and what illada needs (versions, images, the shared volume)."""

from __future__ import annotations

import copy

import pytest
import yaml

from infra import check

DOCS = {doc["metadata"]["name"] + "/" + doc["kind"]: doc for _, doc in check.documents()}


def doc(key: str) -> dict:
    return copy.deepcopy(DOCS[key])


def test_every_shipped_manifest_checks_out():
    assert {"illada/RayCluster", "illada-pretrain-8b/RayJob", "mlflow/Deployment", "mlflow-postgres/StatefulSet", "illada-shared/PersistentVolumeClaim"} <= set(DOCS)
    assert check.check_all() == []


def test_kuberay_schema_catches_misspelt_fields_and_non_string_start_params():
    cluster = doc("illada/RayCluster")
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")
    assert any("'workerGroupSpec' was unexpected" in p for p in check.check_k8s(cluster))

    cluster = doc("illada/RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 16  # the API server wants strings
    assert any("16 is not of type 'string'" in p for p in check.check_k8s(cluster))

    job = doc("illada-pretrain-8b/RayJob")
    job["spec"]["submissionMode"] = "K8sMode"
    assert any("'K8sMode' is not one of" in p for p in check.check_k8s(job))


def test_pod_templates_are_checked_against_kubernetes():
    job = doc("illada-pretrain-8b/RayJob")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    [problem] = check.check_k8s(job)
    assert problem.startswith("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0") and "'resource' was unexpected" in problem


def test_kubernetes_objects_are_checked_strictly():
    deployment = doc("mlflow/Deployment")
    deployment["spec"]["replicas"] = "2"
    assert any("'2' is not of type 'integer'" in p for p in check.check_k8s(deployment))
    claim = doc("illada-shared/PersistentVolumeClaim")
    claim["spec"]["accesModes"] = claim["spec"].pop("accessModes")
    assert check.check_k8s(claim)


def test_ray_pods_run_the_right_image_mount_the_shared_volume_and_match_the_ray_pin():
    cluster = doc("illada/RayCluster")
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    gpu["containers"][0]["image"] = gpu["containers"][0]["image"].replace("illada-gpu", "illada-cpu")
    gpu["containers"][0]["volumeMounts"] = [m for m in gpu["containers"][0]["volumeMounts"] if m["mountPath"] != "/mnt/shared"]
    cluster["spec"]["rayVersion"] = "2.59.0"
    problems = check.check_ray_pods(cluster)
    assert any("is not pyproject.toml's ray 2.60.0" in p for p in problems)
    assert any("workerGroupSpecs.0.template: illada-cpu with GPU limit 8" in p for p in problems)
    assert any("workerGroupSpecs.0.template: does not mount the illada-shared volume" in p for p in problems)


def test_the_rayjob_entrypoint_config_must_load():
    job = doc("illada-pretrain-8b/RayJob")
    assert check.check_rayjob_entrypoint(job) == []
    job["spec"]["entrypoint"] += " train.steps=0"
    assert any("train.steps" in p for p in check.check_rayjob_entrypoint(job))
    job["spec"]["entrypoint"] = "python -m pipelines.pretrain /tmp/mine.yaml"
    assert check.check_rayjob_entrypoint(job) == ["entrypoint config /tmp/mine.yaml is not in the image (/opt/illada/...)"]


@pytest.fixture
def launcher(tmp_path):
    raw = yaml.safe_load((check.INFRA / "ray" / "cluster-aws.yaml").read_text())

    def write(mutate) -> list[str]:
        changed = copy.deepcopy(raw)
        mutate(changed)
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(changed))
        return check.check_launcher(path)

    return write


def test_the_launcher_config_is_prepared_as_ray_up_would(launcher):
    assert launcher(lambda c: None) == []
    assert any("ray up would refuse it" in p and "max_worker" in p for p in launcher(lambda c: c.update(max_worker=40)))
    assert any("head_node_type" in p for p in launcher(lambda c: c.update(head_node_type="control")))

    def typo(c):
        c["available_node_types"]["gpu"]["node_config"]["InstanceTyp"] = c["available_node_types"]["gpu"]["node_config"].pop("InstanceType")

    assert any(p.startswith("node type gpu: node_config is not an EC2 RunInstances request") and "InstanceTyp" in p for p in launcher(typo))

    def gpu_without_gpu_image(c):
        c["available_node_types"]["gpu"].pop("docker")

    assert any(p.startswith("node type gpu: 8 GPUs with image") for p in launcher(gpu_without_gpu_image))


def test_images_carry_the_project_version_and_share_one_python(monkeypatch):
    assert check.check_images(["image: registry.example.com/illada/illada-gpu:0.1.0"]) == []
    assert check.check_images(["image: r.example/illada-gpu:0.0.9"]) == ["image r.example/illada-gpu:0.0.9: tag 0.0.9 is not the project's version 0.1.0"]
    real = check.dockerfile_args
    monkeypatch.setattr(check, "dockerfile_args", lambda name: {"PYTHON_MINOR": "3.11"} if name == "cpu" else real(name))
    assert any("PYTHON_MINOR (3.12) and cpu.Dockerfile's (3.11) differ" in p for p in check.check_images([]))
