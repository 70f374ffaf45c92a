"""DICOM against NIfTI on the same scans: read, segment and write each way, and the PACS round trip (Orthanc).

For each scan, side by side in one run with one warm model:
  nifti      read the .nii.gz, segment, encode the segmentation as .nii.gz          (what POST /predict does)
  dicom      read the same scan as a DICOM series folder, segment, encode a SEG     (mlops predict FOLDER)
  pacs       WADO-RS retrieve from Orthanc, segment, SEG, STOW-RS store             (POST /dicomweb/segment)
The labels of the three must be equal (printed as a check). Figures are medians over the scans, after one warm-up.

    python benchmarks/bench_dicom.py --model MODEL_DIR [--cases 10] [--no-pacs]
Scans: the real Task04 test scans (../shared/data) when present, else the synthetic task's test scans. The PACS
rows need Debian's orthanc + orthanc-dicomweb (started here on a free port, stopped after).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from mlops.config import load_config
from mlops.dicom import web
from mlops.dicom.convert import series_from_nifti, write_series
from mlops.dicom.seg import read_labels
from mlops.dicom.series import assemble, dataset_instances, part10, read_folder
from mlops.pipeline import budget, load_segmenter, open_case, read_case, seg_for, segment_case
from mlops.volumes import to_gzip_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"Name": "bench", "StorageDirectory": str(folder), "IndexDirectory": str(folder), "HttpPort": port,
              "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    root = f"http://127.0.0.1:{port}/dicom-web"
    for _ in range(300):
        try:
            if httpx.get(f"{root}/studies", timeout=1).is_success:
                return proc, root
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("Orthanc did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--no-pacs", action="store_true")
    parser.add_argument("--tta", action="store_true", help="mirroring on (off by default: the I/O is what differs)")
    args = parser.parse_args()
    real = SHARED / "Task04_Hippocampus" / "imagesTs"
    scans = sorted(real.glob("*.nii.gz"))[: args.cases]
    if not scans:
        raise SystemExit(f"no scans in {real}")
    cfg = load_config([f"predict.model_dir={args.model}", f"predict.tta={str(args.tta).lower()}"])
    seg_model = load_segmenter(cfg, args.model)
    limits = budget(seg_model, cfg.predict.max_request_mib)
    tmp = Path(tempfile.mkdtemp())
    orthanc, root = (None, "") if args.no_pacs else start_orthanc(tmp / "orthanc")
    rows: dict[str, list[float]] = {"nifti": [], "dicom": [], "pacs": []}
    equal = 0
    try:
        for i, scan in enumerate([scans[0], *scans]):  # the first one twice: a warm-up, not counted
            folder = tmp / f"series{i}"
            datasets = series_from_nifti(nib.load(scan))
            write_series(datasets, folder)
            if orthanc is not None:
                web.store(root, datasets)
            t0 = time.perf_counter()
            case = read_case(seg_model, [scan], None, limits)
            nifti = segment_case(seg_model, case)
            to_gzip_bytes(nifti.image, level=1)
            t_nifti = time.perf_counter() - t0
            t0 = time.perf_counter()
            series = read_folder(folder, None, None, limits)
            result = segment_case(seg_model, open_case(seg_model, series.image, series.name, limits))
            seg = seg_for(seg_model, series, result.labels, cfg)
            part10(seg)
            t_dicom = time.perf_counter() - t0
            same = np.array_equal(read_labels(seg, series), result.labels)
            t_pacs = float("nan")
            if orthanc is not None:
                t0 = time.perf_counter()
                ref = web.SeriesRef(root, str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID))
                got = web.retrieve_series(ref, 4000)
                pulled = assemble(dataset_instances(got, "pacs"), "pacs", ref.series, None, limits)
                again = segment_case(seg_model, open_case(seg_model, pulled.image, "pacs", limits))
                web.store(root, [seg_for(seg_model, pulled, again.labels, cfg)])
                t_pacs = time.perf_counter() - t0
                same = same and np.array_equal(again.labels, result.labels)
            # the DICOM grid may run its slices the other way: compare in the NIfTI scan's orientation
            flip = nib.orientations.ornt_transform(nib.io_orientation(series.image.affine),
                                                   nib.io_orientation(nifti.image.affine))  # fmt: skip
            mapped = nib.orientations.apply_orientation(result.labels, flip)
            same = same and np.array_equal(mapped, nifti.labels)
            if i == 0:
                continue
            equal += same
            rows["nifti"].append(t_nifti)
            rows["dicom"].append(t_dicom)
            rows["pacs"].append(t_pacs)
            print(
                f"{scan.name}: nifti {t_nifti:.3f} s, dicom {t_dicom:.3f} s, pacs {t_pacs:.3f} s, labels equal {same}"
            )
    finally:
        if orthanc is not None:
            orthanc.terminate()
            orthanc.wait(timeout=30)
    base = statistics.median(rows["nifti"])
    print(f"\n{len(scans)} scans, tta {args.tta}, model {args.model.name}; labels equal in {equal} of {len(scans)}")
    print("| path | median s per scan | x NIfTI path |\n|---|---|---|")
    for name, values in rows.items():
        if all(np.isnan(values)):
            continue
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
