"""`mlops batch`: a cohort on a real local Ray (2 CPUs), the same files as `mlops predict`, a table, resume, faults.

Every run here is the real `mlops batch` process, a driver joining the session's one local Ray head (``ray_head``,
``--address``) as it would join a cluster, with real actors. GCS cannot be reached
from here: a ``file://`` URL (fsspec's local filesystem, through the same code path as ``gs://``) stands in for it.
fsspec's ``memory://`` cannot: each Ray worker is its own process with its own memory filesystem.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mlops.batch.sources import RECORDS, list_cases
from mlops.errors import DatasetError
from mlops.monitoring.signals import SIGNAL_COLUMNS

from .conftest import HIPPOCAMPUS, RAY_CPUS, RayHead, TrainedModel, free_port, pids, run_mlops

SETTINGS = ["predict.tta=false"]


def batch_args(trained: TrainedModel, source: str, dest: str, address: str | None, *extra: str) -> list[str]:
    """``address`` None: `mlops batch` starts (and stops) a local Ray of its own, as it does for a user by default."""
    joins = ["--address", address] if address else [f"batch.ray.num_cpus={RAY_CPUS}"]
    return ["batch", source, "-o", dest, "--model", str(trained.model_dir), *joins, *SETTINGS, *extra]


def batch_env(trained: TrainedModel, head: RayHead | None) -> dict[str, str]:
    return {**trained.workspace.env(), **(head.env if head else {})}


def table(dest: Path) -> pd.DataFrame:
    parquet = pd.read_parquet(dest / "volumes.parquet")
    csv = pd.read_csv(dest / "volumes.csv")
    assert list(parquet.columns) == list(csv.columns)
    assert list(parquet["case"]) == list(csv["case"].astype(str))
    return parquet.set_index("case")


def no_partial_files(dest: Path) -> None:
    assert not [p for p in dest.rglob("*") if ".part" in p.name], "a half-written file was left behind"


def cohort(src_task: Path, dst: Path, n: int) -> list[Path]:
    """``n`` scans of a task (test images first, then training images) in one folder."""
    dst.mkdir(parents=True, exist_ok=True)
    scans = sorted((src_task / "imagesTs").glob("*.nii.gz")) + sorted((src_task / "imagesTr").glob("*.nii.gz"))
    for scan in scans[:n]:
        shutil.copy(scan, dst / scan.name)
    return sorted(dst.iterdir())


def assert_same_as_predict(
    trained: TrainedModel, folder: Path, dest: Path, ref: Path, head: RayHead | None, extra: tuple[str, ...] = ()
) -> None:
    """Each segmentation byte for byte (decompressed: header and voxels) as `mlops predict`; volumes as its --json."""
    env = batch_env(trained, head)
    address = head.address if head else None
    proc = run_mlops(*batch_args(trained, str(folder), str(dest), address, "--actors", "2", *extra), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc_ref = run_mlops(
        "predict", str(folder), "-o", str(ref), "--model", str(trained.model_dir), "--json", *SETTINGS[:1], *extra,
        env=env,
    )  # fmt: skip
    assert proc_ref.returncode == 0, proc_ref.stderr[-4000:]
    expected = {Path(r["output"]).name.removesuffix(".nii.gz"): r for r in json.loads(proc_ref.stdout)}
    rows = table(dest)
    assert sorted(rows.index) == sorted(expected)
    assert set(rows["status"]) == {"ok"}
    assert rows["worker"].nunique() == 2, "both actors should have segmented cases"
    for case, want in expected.items():
        got = gzip.decompress((dest / f"{case}.nii.gz").read_bytes())
        assert got == gzip.decompress(Path(want["output"]).read_bytes()), f"{case}: differs from mlops predict"
        for name, mm3 in want["volumes_mm3"].items():
            assert rows.loc[case, f"{name}_mm3"] == pytest.approx(mm3, abs=1e-3)
        for column in SIGNAL_COLUMNS:  # the same output signals (model health) as `mlops predict --json`
            expected_signal = want["signals"][column]
            got_signal = rows.loc[case, column]
            assert np.isnan(got_signal) if expected_signal is None else got_signal == pytest.approx(expected_signal)
        img = nib.load(dest / f"{case}.nii.gz")
        assert rows.loc[case, "shape"] == "x".join(map(str, img.shape))
    no_partial_files(dest)


def test_batch_folder_equals_predict(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, ray_head: RayHead
) -> None:
    folder = tmp_path / "cohort"
    cohort(synth_task, folder, 4)
    assert_same_as_predict(trained_synth, folder, tmp_path / "out", tmp_path / "ref", ray_head)


@pytest.mark.real_data
@pytest.mark.slow
def test_batch_real_scans_equal_predict(trained_real: TrainedModel, tmp_path: Path) -> None:
    """Real hippocampus scans with mirroring (the default), two actors, against `mlops predict` on the same files.
    This run starts its own local Ray, the default for a user (no ``--address``); it is the slow tier's only one."""
    folder = tmp_path / "cohort"
    cohort(HIPPOCAMPUS, folder, 6)
    assert_same_as_predict(trained_real, folder, tmp_path / "out", tmp_path / "ref", None, ("predict.tta=true",))


def bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    junk = folder / "junk.nii.gz"
    junk.write_bytes(os.urandom(2000))
    flat = folder / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    good = next(iter(sorted(folder.glob("synth_*.nii.gz"))))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return {"junk": junk, "flat": flat, "truncated": truncated}


def test_manifest_bad_rows_resume_and_force(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, ray_head: RayHead
) -> None:
    """Junk, truncated, 2D, missing and empty rows become error rows; the rest is written; re-runs skip; --force."""
    folder = tmp_path / "scans"
    good = cohort(synth_task, folder, 2)
    bad = bad_inputs(folder)
    rows = [{"path": p.name, "subject": f"subj-{i}"} for i, p in enumerate(good)]  # relative to the manifest
    rows += [{"path": str(p), "subject": name} for name, p in bad.items()]
    rows += [{"path": str(tmp_path / "gone.nii.gz"), "subject": "gone"}, {"path": "", "subject": "empty"}]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    dest = tmp_path / "out"
    url = f"file://{dest}"  # stands in for gs://bucket/prefix (same fsspec code path)
    env, args = batch_env(trained_synth, ray_head), batch_args(trained_synth, str(manifest), url, ray_head.address)

    proc = run_mlops(*args, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "5 of 7 case(s) failed" in proc.stderr
    t = table(dest)
    assert len(t) == 7
    ok = [p.name.removesuffix(".nii.gz") for p in good]
    assert list(t.loc[ok, "status"]) == ["ok", "ok"]
    assert list(t.loc[ok, "subject"]) == ["subj-0", "subj-1"]
    errors = t[t["status"] == "failed"]["error"].to_dict()
    assert "junk.nii.gz: not a NIfTI" in errors["junk"]
    assert "truncated" in errors["truncated"]
    assert "2D image" in errors["flat"]
    assert "no such file" in errors["gone"]
    assert "row 7 has no path" in errors["row7"]
    assert sorted(p.name for p in dest.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in ok)
    assert sorted(p.name for p in (dest / RECORDS).iterdir()) == sorted(f"{c}.json" for c in ok)
    no_partial_files(dest)
    first = {c: (dest / f"{c}.nii.gz").stat().st_mtime_ns for c in ok}
    run_id = t.loc[ok[0], "run_id"]

    proc = run_mlops(*args, env=env)  # resume: nothing to redo
    assert proc.returncode == 1
    t2 = table(dest)
    assert list(t2.loc[ok, "status"]) == ["skipped", "skipped"]
    assert list(t2.loc[ok, "run_id"]) == [run_id, run_id]  # the run that wrote them
    assert {c: (dest / f"{c}.nii.gz").stat().st_mtime_ns for c in ok} == first
    for c in ok:
        assert t2.loc[c, "Anterior_mm3"] == t.loc[c, "Anterior_mm3"]

    proc = run_mlops(*args, "--force", env=env)
    assert proc.returncode == 1
    t3 = table(dest)
    assert list(t3.loc[ok, "status"]) == ["ok", "ok"]
    assert t3.loc[ok[0], "run_id"] != run_id
    assert all((dest / f"{c}.nii.gz").stat().st_mtime_ns > first[c] for c in ok)


def test_killed_actor_still_writes_every_case_once(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, ray_head: RayHead
) -> None:
    """SIGKILL the actor mid-run: Ray restarts it and retries its call; every case ends written exactly once."""
    folder = tmp_path / "cohort"
    scans = cohort(synth_task, folder, 8)
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"path": [str(p) for p in scans], "subject": [f"s{i}" for i in range(len(scans))]}).to_parquet(
        manifest
    )
    dest = tmp_path / "out"
    exe = Path(sys.executable).parent / "mlops"
    log = tmp_path / "batch.log"
    args = batch_args(trained_synth, str(manifest), str(dest), ray_head.address, "--actors", "1", "batch.batch_size=2")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(exe), *args],
            env=batch_env(trained_synth, ray_head),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed and proc.poll() is None:
            if (dest / RECORDS).is_dir() and any((dest / RECORDS).iterdir()):
                for pid in pids(starting="ray::MapWorker"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                killed_at = time.time_ns()
            time.sleep(0.1)
        assert killed, f"no actor to kill:\n{log.read_text()[-3000:]}"
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    t = table(dest)
    assert len(t) == len(scans) and set(t["status"]) == {"ok"}
    by_killed = t[t["worker"].str.rpartition(":")[2].astype(int).isin(killed)].index
    assert len(by_killed) >= 1 and t["worker"].nunique() == 2, "the killed actor's cases stay, a new one did the rest"
    for case in by_killed:  # written once: Ray's retry of the dead actor's call did not segment them again
        assert (dest / f"{case}.nii.gz").stat().st_mtime_ns < killed_at
    assert sorted(p.name for p in dest.glob("*.nii.gz")) == sorted(p.name for p in scans)
    for p in scans:
        assert nib.load(dest / p.name).shape == nib.load(p).shape
    no_partial_files(dest)


def test_unreachable_cluster_is_one_clear_error(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, ray_head: RayHead
) -> None:
    """A head that is not there is one line in seconds (Ray itself retries a silent address for minutes); a head
    that refuses the driver (a wrong token) is Ray's own error in one line; a malformed address is a config error.
    Nothing is written."""
    env = {k: v for k, v in trained_synth.workspace.env().items() if k != "RAY_ADDRESS"}
    source, dest = str(synth_task / "imagesTs"), str(tmp_path / "out")
    nobody = f"127.0.0.1:{free_port()}"
    wrong_token = {**ray_head.env, "RAY_AUTH_TOKEN": "0" * 32}
    for address, extra_env, code, says in (
        (nobody, {}, 1, f"cannot reach the Ray cluster at {nobody} (connection refused within 10 s"),
        (f"ray://{nobody}", {}, 1, f"cannot reach the Ray cluster at ray://{nobody} (connection refused"),
        (ray_head.address, wrong_token, 1, f"cannot start the Ray cluster at {ray_head.address} ("),
        (
            "http://head:8265",
            {},
            2,
            "batch.ray.address='http://head:8265': expected auto, HOST:PORT or ray://HOST[:PORT]",
        ),
    ):
        proc = run_mlops(*batch_args(trained_synth, source, dest, address), env={**env, **extra_env})
        assert proc.returncode == code, proc.stderr[-3000:]
        assert says in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_listing_rules(synth_task: Path, tmp_path: Path) -> None:
    """Case ids follow nnU-Net's naming, must be unique, and a manifest names its problems."""
    cases = list_cases(str(synth_task / "imagesTs"), f"file://{tmp_path}/out")
    assert [c.case for c in cases] == ["synth_008", "synth_009"]
    assert cases[0].output == f"{tmp_path}/out/synth_008.nii.gz"  # a file:// URL is a local path
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(synth_task / "imagesTs" / "synth_008.nii.gz", tmp_path / sub / "T1w_0000.nii.gz")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a/T1w_0000.nii.gz", "b/T1w_0000.nii.gz"]}).to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match=r"(?s)1 case id\(s\) occur twice.*'case' column"):
        list_cases(str(manifest), str(tmp_path / "out"))
    pd.DataFrame({"path": ["a/T1w_0000.nii.gz", "b/T1w_0000.nii.gz"], "case": ["sub-a", "sub-b"]}).to_csv(
        manifest, index=False
    )
    cases = list_cases(str(manifest), str(tmp_path / "out"))
    assert [(c.case, c.input) for c in cases] == [
        ("sub-a", str(tmp_path / "a" / "T1w_0000.nii.gz")),
        ("sub-b", str(tmp_path / "b" / "T1w_0000.nii.gz")),
    ]
    pd.DataFrame({"image": ["a/T1w_0000.nii.gz"]}).to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match=r"m.csv: no 'path' column \(columns: image\)"):
        list_cases(str(manifest), str(tmp_path / "out"))
    links = tmp_path / "links"  # a folder of symlinks (nnU-Net's _0000 naming, as scripts often lay it out)
    links.mkdir()
    (links / "x_0000.nii.gz").symlink_to(synth_task / "imagesTs" / "synth_008.nii.gz")
    (links / "dangling_0000.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    assert [c.case for c in list_cases(str(links), str(tmp_path / "out"))] == ["x"]
    with pytest.raises(DatasetError, match="is, or is inside, the input folder"):
        list_cases(str(tmp_path / "a"), str(tmp_path / "a"))
    with pytest.raises(DatasetError, match="no such folder"):
        list_cases(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_kuberay_manifests_match_the_code() -> None:
    """The RayJob runs a `mlops batch` this code accepts, on the image Cloud Build pushes, with the pinned Ray, and
    asks Kubernetes for at least the GPUs and CPUs its actors request (no Kubernetes here: checked against the code)."""
    import shlex

    import ray
    import typer
    import yaml

    from mlops.cli import app
    from mlops.config import load_config

    from .conftest import REPO

    job = yaml.safe_load((REPO / "deploy/kuberay/rayjob.yaml").read_text())
    cluster = yaml.safe_load((REPO / "deploy/kuberay/raycluster.yaml").read_text())
    assert (job["apiVersion"], job["kind"], cluster["kind"]) == ("ray.io/v1", "RayJob", "RayCluster")
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    train_image = next(i for i in build["images"] if "/train:" in i)
    repository = build["substitutions"]["_REPOSITORY"]
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["rayVersion"] == ray.__version__
        pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for group in pods:
            (container,) = group["template"]["spec"]["containers"]
            assert container["image"].endswith(f"/{repository}/train:latest"), container["image"]
            assert train_image.split("/")[-1].startswith("train:")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["mlops", "batch"]
    command = typer.main.get_command(app).commands["batch"]  # type: ignore[attr-defined]
    ctx = command.make_context("batch", argv[2:])  # every flag exists and parses
    overrides = [a for a in ctx.params["args"] if "=" in a]
    cfg = load_config(overrides)
    assert cfg.batch.ray.address == "auto"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) * workers["replicas"] >= cfg.batch.actors * cfg.batch.gpus_per_actor
    assert float(limits["cpu"]) >= cfg.batch.cpus_per_actor
    dockerfile = (REPO / "dockerfiles/train.dockerfile").read_text()
    assert f'"ray[default]=={ray.__version__}"' in dockerfile
