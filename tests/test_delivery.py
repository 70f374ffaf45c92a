"""Delivery files checked by their own tools, and the API image's start-up line run as Cloud Run would run it.

Docker, Cloud Build, Cloud Run and GitHub's runners are not available here: the linters read the files, the
Cloud Build substitutions are expanded the way Cloud Build documents them, and the container's CMD runs through
`sh -c` on this machine with the environment Cloud Run gives a container (plus MLOPS_HOST=127.0.0.1).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml

from .conftest import REPO, TrainedModel, free_port, wait_ready

BIN = Path(sys.executable).parent


def tracked_files() -> list[Path]:
    """The repository's files as a clone has them (git's list), else every file outside data and environments."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode == 0 and proc.stdout:
        return [REPO / p for p in proc.stdout.split("\0") if p and (REPO / p).is_file()]
    skip = {".venv", ".git", "data", "reports", "node_modules"}
    return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_every_yaml_and_json_file_parses() -> None:
    files = [p for p in tracked_files() if p.suffix in (".yaml", ".yml", ".json")]
    names = {str(p.relative_to(REPO)) for p in files}
    assert {".github/workflows/tests.yml", "cloudbuild.yaml", "dvc.yaml", ".devcontainer/devcontainer.json"} <= names
    for path in files:
        text = path.read_text()
        try:
            json.loads(text) if path.suffix == ".json" else list(yaml.safe_load_all(text))
        except (ValueError, yaml.YAMLError) as exc:
            pytest.fail(f"{path.relative_to(REPO)} does not parse: {exc}")


# Each linter on the repository's own files (must pass), and on a copy with the kind of error it exists to catch.
WORKFLOW = REPO / ".github/workflows/tests.yml"
LINTERS = {
    "actionlint": (
        ["actionlint"],
        WORKFLOW,
        [('- name: "Tests: make test"', "- name: Tests: make test")],
        "could not parse",
    ),
    "actionlint-old-action": (["actionlint"], WORKFLOW, [("actions/checkout@v6", "actions/checkout@v4")], "node20"),
    "check-jsonschema-workflows": (
        ["check-jsonschema", "--builtin-schema", "vendor.github-workflows"],
        WORKFLOW,
        [("runs-on: ubuntu-latest", "runs_on: ubuntu-latest")],
        "runs_on",
    ),
    "check-jsonschema-cloudbuild": (
        ["check-jsonschema", "--builtin-schema", "vendor.cloudbuild"],
        REPO / "cloudbuild.yaml",
        [("machineType: E2_HIGHCPU_8", "machineType: 8")],
        "machineType",
    ),
    "hadolint": (
        ["hadolint", "--no-color"],
        REPO / "dockerfiles/train.dockerfile",
        [("ENV PIP_NO_CACHE_DIR", "RUN apt-get update && apt-get install -y --no-install-recommends make\nENV X=1")],
        "DL3008",
    ),
}


@pytest.mark.parametrize("name", list(LINTERS))
def test_linter_passes_here_and_catches_errors(name: str, tmp_path: Path) -> None:
    cmd, target, edits, finding = LINTERS[name]
    exe = [str(BIN / cmd[0]), *cmd[1:]]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    good = subprocess.run([*exe, str(target)], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert good.returncode == 0, f"{name} on {target.relative_to(REPO)}:\n{good.stdout}{good.stderr}"
    broken = tmp_path / ".github/workflows" / target.name if "workflow" in str(target) else tmp_path / target.name
    broken.parent.mkdir(parents=True, exist_ok=True)
    text = target.read_text()
    for old, new in edits:
        assert old in text, f"{old!r} not in {target}"
        text = text.replace(old, new)
    broken.write_text(text)
    bad = subprocess.run([*exe, str(broken)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode != 0, f"{name} accepted a broken {target.name}:\n{bad.stdout}{bad.stderr}"
    assert finding in bad.stdout + bad.stderr


# Cloud Build's built-in substitutions; a manual `gcloud builds submit` fills these but not the trigger-only ones.
CLOUDBUILD_MANUAL = {"PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT"}
CLOUDBUILD_TRIGGER = {"COMMIT_SHA", "SHORT_SHA", "REVISION_ID", "BRANCH_NAME", "TAG_NAME", "REPO_NAME"}
SUBST_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _expand(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"${name} is not defined for this build"
        return values[name]

    return SUBST_RE.sub(one, text)


def test_cloudbuild_substitutions_give_valid_tags_manual_and_triggered() -> None:
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    used = {m.group(1) or m.group(2) for s in _strings(build) for m in SUBST_RE.finditer(s)}
    defined = set(build["substitutions"])
    assert "SHORT_SHA" not in used and not used & CLOUDBUILD_TRIGGER, "a manual submit has no trigger substitutions"
    assert {u for u in used if u.startswith("_")} <= defined, f"undefined: {sorted(used - defined - CLOUDBUILD_MANUAL)}"
    assert used <= defined | CLOUDBUILD_MANUAL
    assert build["options"].get("dynamicSubstitutions") is True  # _TAG's default refers to ${BUILD_ID}

    manual = {"PROJECT_ID": "my-project", "BUILD_ID": "4f1c2b9e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}
    triggered = {**manual, "SHORT_SHA": "1a2b3c4", "_TAG": "1a2b3c4"}  # a trigger overriding _TAG=$SHORT_SHA
    tag = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # Docker's tag grammar
    ref = re.compile(rf"^[a-z0-9-]+-docker\.pkg\.dev/[a-z0-9-]+/[a-z0-9-]+/(api|train):{tag}$")
    for builtins in (manual, triggered):
        values = {k: _expand(str(v), builtins) for k, v in build["substitutions"].items()}
        values.update(builtins)
        images = [_expand(i, values) for i in build["images"]]
        assert len(images) == 2 and all(ref.match(i) for i in images), images
        deploy = next(s for s in build["steps"] if s["id"] == "deploy")
        image = _expand(deploy["args"][deploy["args"].index("--image") + 1], values)
        assert image == images[0] and image.endswith(":" + builtins.get("_TAG", manual["BUILD_ID"]))
        for step in build["steps"]:
            for arg in step["args"]:
                _expand(arg, values)  # every substitution resolves


def dockerfile_cmd(path: Path) -> list[str]:
    """The exec-form CMD of a Dockerfile (the last one wins, as in Docker), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    cmds = [line.strip()[3:].strip() for line in text.splitlines() if line.strip().upper().startswith("CMD ")]
    assert cmds, f"{path}: no CMD"
    return json.loads(cmds[-1])


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh, as the image has")
def test_api_image_cmd_serves_with_cloud_run_env(trained_synth: TrainedModel, synth_task: Path, tmp_path: Path) -> None:
    cmd = dockerfile_cmd(REPO / "dockerfiles/api.dockerfile")
    assert cmd[:2] == ["sh", "-c"] and "mlops serve" in cmd[2]
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "MLOPS_"))}
    env.update(
        # What the image sets (ENV lines of api.dockerfile), with this machine's paths.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLOPS_CONFIG_DIR=str(REPO / "configs"),
        MLOPS_DATA_DIR=str(data),
        # What Cloud Run and cloudbuild.yaml's deploy step set.
        PORT=str(port),
        K_SERVICE="mlops-segmentation",
        K_REVISION="mlops-segmentation-00001-abc",
        K_CONFIGURATION="mlops-segmentation",
        MODEL_URI=f"file://{trained_synth.model_dir}",
        MAX_IN_FLIGHT="2",
        MONITOR_STORE=f"file://{tmp_path / 'monitoring'}",  # stands in for gs://bucket/monitoring (same fsspec path)
        # Only here: listen on the loopback interface instead of the container's 0.0.0.0.
        MLOPS_HOST="127.0.0.1",
        TMPDIR=str(tmp_path),
    )
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(proc, url, log)
            # The model was fetched from MODEL_URI into the data root's model cache, and is what is served.
            cached = data / "model_cache" / trained_synth.model_dir.name
            assert ready.json()["model"] == cached.name and (cached / "fold_0" / "checkpoint_final.pth").is_file()

            case = sorted((synth_task / "imagesTs").glob("*.nii.gz"))[0]
            resp = httpx.post(
                f"{url}/predict", files={"file": (case.name, case.read_bytes())}, params={"tta": "false"}, timeout=120
            )
            assert resp.status_code == 200, resp.text
            seg = nib.Nifti1Image.from_bytes(gzip.decompress(resp.content))
            img = nib.load(case)
            assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
            labels = np.unique(np.asanyarray(seg.dataobj))
            assert set(labels.tolist()) <= {0, 1, 2} and len(labels) > 1  # the trained model finds structures
            volumes = json.loads(resp.headers["X-Label-Volumes-mm3"])
            assert volumes and all(v >= 0 for v in volumes.values())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert proc.returncode is not None
    # The request's record (statistics and output signals, never the file name) went to MONITOR_STORE.
    (record,) = (tmp_path / "monitoring").rglob("*.jsonl")
    text = record.read_text()
    assert len(text.splitlines()) == 1 and case.name not in text
