"""3D route prediction on CPU: peak memory of a big synthetic scan, and end-to-end against forward-only time.

    python benchmarks/predict_3d.py [--threads 1] [--skip-rss] [--skip-ratio]
        [--rss-shape 512 512 300] [--rss-window 128 128 64] [--rss-overlap 0.25] [--rss-batch-sizes 1 [4 ...]]
        [--stages] [--data ../shared/data/Task04_Hippocampus/imagesTs] [--limit 20] [--batch-size 32] [--repeat 2]

Latest runs (today's 3D default network, predict's default mirroring; 2 CPU cores shared with two training
runs; see the README): (a) 3.29 GB at 1 window per forward, 3.66 GB at --batch-size 32; (b) ratio 1.13 (CPU).

Earlier runs (the previous 3D geometry, no mirroring; load average ~8; torch 2.14 CPU, MONAI 1.6.1):

    OMP_NUM_THREADS=1 python benchmarks/predict_3d.py --threads 1                       # (a) ~7 min, (b) ~1.5 min
    OMP_NUM_THREADS=1 python benchmarks/predict_3d.py --threads 1 --skip-ratio --stages  # (a) + per-step breakdown
    OMP_NUM_THREADS=1 python benchmarks/predict_3d.py --threads 1 --skip-rss --repeat 3  # (b) alone

    (a) 512x512x300, 128x128x64 windows, overlap 0.25 (150 windows), 1 window per forward
        peak RSS of `seg-transfer predict`          3.48 GB (3.51 GB in a second run)   goal <= 4 GB
        one forward + softmax, 1 / 4 windows        +0.46 / +1.48 GB (predict's default 32: ~11 GB)
        step (--stages)                 peak      after
        python + imports                0.99 GB   0.99 GB
        load checkpoint                 1.11 GB   1.11 GB
        read + preprocess               2.06 GB   1.43 GB
        sliding window (probabilities)  3.40 GB   2.45 GB   (372 s)
        arg-max -> uint8 label map      3.16 GB   2.53 GB   (8.7 s)
        Invertd (nearest) + rint        1.82 GB   1.67 GB
        write label map (.nii.gz)       1.67 GB   1.67 GB
    (b) 20 Hippocampus test cases, 21 windows of 40x56x40, overlap 0.5
        end_to_end / forward: CPU time 1.19 and 1.27, wall 1.02 to 1.47 over four runs   goal <= 1.3
        per case beyond the forward: read + preprocess ~6-9 ms, arg-max ~6-9 ms, Invertd ~4-6 ms,
        write ~2 ms, checkpoint loading ~11-14 ms (once per run, 20 cases); forward ~130-150 ms (CPU)

The network is always the Hippocampus 3D config's (configs/hippocampus_3d_effnet_lite0.yaml: EfficientNet-Lite0
inflated to 3D, ``encoder_depth`` 3, decoder 64/32/16, 3 classes) with random weights
(``encoder_weights: none``; neither memory nor time depends on the weights), saved as a route-``3d``
:class:`Checkpoint` whose ``route_settings["patch_size"]`` is the window.

(a) Peak RSS: one synthetic float32 volume of ``--rss-shape`` (default 512x512x300, an uncompressed NIfTI
in a temp folder) through ``python -m seg_transfer predict --device cpu`` in a child process, once per
``--rss-batch-sizes`` (windows per forward); the child's own peak RSS comes from ``os.wait4``. Windows
are ``--rss-window`` (default 128x128x64, a typical CT patch) at ``--rss-overlap`` (default 0.25): the
Hippocampus 40x56x40 windows at overlap 0.5 would be ~30k forward passes on this volume, too slow on
one CPU thread, while RSS hardly depends on the window (activations of one batch aside). Goal: <= 4 GB.
With ``--stages`` a second child runs the same steps as ``predict`` one by one (read + preprocess,
sliding-window probabilities, arg-max, ``Invertd``, write) and prints the peak RSS *within* each step
(VmHWM reset through /proc/self/clear_refs) and what is left allocated after it, to show where the
memory goes.

(b) Time: the first ``--limit`` (20) Hippocampus test images (skipped if ``--data`` is absent) with the
config's own 40x56x40 windows at the 3D default overlap 0.5 and ``--batch-size`` windows per forward.
End to end = ``run_predict`` (load checkpoint, read, preprocess, sliding window, ``Invertd``, write,
summary), after one warm-up case; forward only = the network's forward + softmax on exactly the windows
the sliding window fed it (recorded beforehand, untimed), after a warm-up forward. Best of
``--repeat``. Goal: end_to_end / forward <= 1.3.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTs"
CONFIG = ROOT / "configs" / "hippocampus_3d_effnet_lite0.yaml"
LABELS = {0: "background", 1: "anterior", 2: "posterior"}
HIPPOCAMPUS_WINDOW = (40, 56, 40)
GB = 1e9


def random_checkpoint(path: Path, window: tuple[int, int, int]) -> Path:
    """A route-``3d`` checkpoint of the Hippocampus 3D architecture with random weights and ``window`` patches."""
    import torch

    from seg_transfer.checkpoint import Checkpoint
    from seg_transfer.config import dump_config, load_config
    from seg_transfer.data.transforms import Preprocessing
    from seg_transfer.routes import get_route

    # no data is read: the repository stands in for data.root so that this works where the dataset is absent
    config = load_config(CONFIG, ["model.encoder_weights=none", f"data.patch_size={list(window)}", f"data.root={ROOT}"])
    torch.manual_seed(0)
    model, _ = get_route("3d").build_network(config.model, 1, len(LABELS), False)
    return Checkpoint(config=dump_config(config), labels=LABELS, preprocessing=Preprocessing.from_config(config.data).as_dict(),
                      weights_provenance={"source": "none"}, model=model.eval().state_dict(), progress={},
                      route="3d", route_settings={"patch_size": list(window)}).save(path)


def synthetic_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A float32 NIfTI of ``shape``: smooth structure plus noise (1 mm x 1 mm x 2.5 mm voxels), uncompressed."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    volume = np.empty(shape, dtype=np.float32)
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    disc = 100.0 * (x**2 + y**2 < 0.6).astype(np.float32)
    for z in range(shape[2]):  # slice by slice: no full-volume temporaries in the parent
        volume[:, :, z] = disc + rng.normal(0.0, 20.0, size=shape[:2]).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), path)
    return path


# --------------------------------------------------------------------------- (a) peak RSS


def child_peak_rss(command: list[str], threads: int) -> tuple[float, float, str]:
    """``(peak RSS in bytes, wall seconds, stdout)`` of ``command`` run as a child (its own rusage, via wait4)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:  # progress bars and logs; shown only if the child fails
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            raise SystemExit(f"child failed (exit {process.returncode}): {' '.join(command)}\n{errors.read()[-3000:]}")
    return usage.ru_maxrss * 1024.0, time.perf_counter() - start, output  # ru_maxrss is KiB on Linux


def predict_rss(checkpoint: Path, volume: Path, out: Path, batch_size: int, overlap: float, threads: int) -> tuple[float, float]:
    command = [sys.executable, "-m", "seg_transfer", "predict", "-m", str(checkpoint), "-i", str(volume), "-o", str(out),
               "--device", "cpu", "--batch-size", str(batch_size), "--overlap", str(overlap), "--overwrite"]
    peak, seconds, _ = child_peak_rss(command, threads)
    return peak, seconds


def _status_bytes(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def stage_breakdown(checkpoint: str, volume: str, out: str, batch_size: int, overlap: float) -> list[dict]:
    """``predict_case`` + ``write_label_map`` step by step (same functions, same order), peak RSS per step.

    Run in a child (``--_stages``); every step's big result is kept exactly as long as ``predict_case`` keeps it.
    """
    import numpy as np
    import torch

    from seg_transfer.inference.cases import discover_cases
    from seg_transfer.inference.predictor import input_geometry, invert_to_input, load_model, preprocess
    from seg_transfer.inference.writers import write_label_map
    from seg_transfer.routes.base import InferenceOptions

    rows: list[dict] = [{"step": "python + imports (torch, MONAI, ...)", "seconds": 0.0, "peak": _status_bytes("VmHWM"),
                         "after": _status_bytes("VmRSS")}]

    def step(name: str, fn):
        _reset_peak()
        start = time.perf_counter()
        result = fn()
        gc.collect()
        rows.append({"step": name, "seconds": time.perf_counter() - start, "peak": _status_bytes("VmHWM"),
                     "after": _status_bytes("VmRSS")})
        return result

    loaded = step("load checkpoint", lambda: load_model(checkpoint, torch.device("cpu")))
    (case,) = discover_cases(volume)
    image = step("read + preprocess", lambda: preprocess(loaded, case))
    geometry = input_geometry(case, image)
    inferer = loaded.network.inferer(InferenceOptions(batch_size=batch_size, overlap=overlap))
    probs = step("sliding window (probabilities)", lambda: inferer.probabilities(loaded.model, image.as_tensor(), loaded.device))
    labels = step("arg-max -> uint8 label map", lambda probs=probs: probs.argmax(0).to(torch.uint8))
    del probs
    gc.collect()
    restored = step("Invertd (nearest) + rint", lambda: np.rint(
        invert_to_input(loaded, image, labels[None], nearest=True)[0].numpy()).astype(np.uint8))
    step("write label map (.nii.gz)", lambda: write_label_map(restored, geometry, Path(out) / "stages.nii.gz"))
    return rows


# --------------------------------------------------------------------------- (b) end to end vs forward only


def record_windows(loaded, cases, batch_size: int) -> list:
    """The batches of windows the 3D inferer feeds the network for ``cases`` (same sliding window, untimed)."""
    import torch

    from seg_transfer.inference.predictor import preprocess
    from seg_transfer.routes.base import InferenceOptions

    batches: list = []
    inferer = loaded.network.inferer(InferenceOptions(batch_size=batch_size))

    class Recorder(torch.nn.Module):
        def forward(self, window):
            batches.append(window.clone())
            return torch.zeros(window.shape[0], len(loaded.labels), *window.shape[2:])

    for case in cases:
        inferer.probabilities(Recorder(), preprocess(loaded, case).as_tensor(), loaded.device)
    return batches


def forward_seconds(model, batches: list) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of the network's forward + softmax over pre-built batches only (after a warm-up)."""
    import torch

    with torch.no_grad():
        torch.softmax(model(batches[0]), 1)
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            torch.softmax(model(batch).float(), 1)
    return time.perf_counter() - start, time.process_time() - cpu


def step_seconds(loaded, cases, batch_size: int, out: Path) -> dict[str, float]:
    """Seconds per step of ``predict_case`` + writing, summed over ``cases`` (the same functions, in order)."""
    import numpy as np
    import torch

    from seg_transfer.inference.predictor import input_geometry, invert_to_input, preprocess
    from seg_transfer.inference.writers import write_label_map
    from seg_transfer.routes.base import InferenceOptions

    inferer = loaded.network.inferer(InferenceOptions(batch_size=batch_size))
    totals: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return result

    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        image = timed("read + preprocess", lambda: preprocess(loaded, case))
        geometry = input_geometry(case, image)
        probs = timed("sliding window (forward, blend, stitch)",
                      lambda: inferer.probabilities(loaded.model, image.as_tensor(), loaded.device))
        labels = timed("arg-max", lambda: probs.argmax(0).to(torch.uint8))
        restored = timed("Invertd + rint", lambda: np.rint(
            invert_to_input(loaded, image, labels[None], nearest=True)[0].numpy()).astype(np.uint8))
        timed("write label map", lambda: write_label_map(restored, geometry, out / f"{case.name}.nii.gz"))
    return totals


def end_to_end_seconds(checkpoint: Path, data: str, batch_size: int, out: Path) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of ``run_predict`` over the cases listed in ``data``, in this process."""
    from seg_transfer.inference.batch import PredictRequest, run_predict
    from seg_transfer.inference.predictor import PredictOptions

    options = PredictOptions(batch_size=batch_size, progress=False)
    start, cpu = time.perf_counter(), time.process_time()
    report = run_predict(PredictRequest((str(checkpoint),), data, out, device="cpu", options=options, overwrite=True))
    seconds = time.perf_counter() - start, time.process_time() - cpu
    if report.failed:
        raise SystemExit(f"{len(report.failed)} case(s) failed, e.g. {report.failed[0].case}: {report.failed[0].reason}")
    return seconds


def time_ratio(args: argparse.Namespace, work: Path) -> None:
    import torch

    from seg_transfer.inference.cases import discover_cases
    from seg_transfer.inference.predictor import load_model

    if not Path(args.data).is_dir():
        print(f"\n(b) skipped: {args.data} not found")
        return
    checkpoint = random_checkpoint(work / "hippocampus_3d.pt", HIPPOCAMPUS_WINDOW)
    cases = discover_cases(args.data)[: args.limit]
    listing = work / "cases.txt"
    listing.write_text("\n".join(str(c.source) for c in cases))
    loaded = load_model(str(checkpoint), torch.device("cpu"))
    batches = record_windows(loaded, cases, args.batch_size)
    windows = sum(int(b.shape[0]) for b in batches)
    warm = work / "warm.txt"
    warm.write_text(str(cases[0].source))
    end_to_end_seconds(checkpoint, str(warm), args.batch_size, work / "warm_out")  # warm-up case, untimed
    forward, pipeline = [], []
    for _ in range(args.repeat):  # interleaved: both see the same load on a shared machine
        forward.append(forward_seconds(loaded.model, batches))
        pipeline.append(end_to_end_seconds(checkpoint, str(listing), args.batch_size, work / "out"))
    n = len(cases)
    print(f"\n(b) {n} Hippocampus test cases, {windows} windows of {'x'.join(map(str, HIPPOCAMPUS_WINDOW))} "
          f"(overlap 0.5, batch {args.batch_size}), CPU, {torch.get_num_threads()} thread(s), best of {args.repeat}")
    print(f"  {'':34s} {'wall':>8s} {'':12s} {'CPU time':>9s}")
    for name, runs in (("forward only (forward + softmax)", forward), ("end to end (run_predict)", pipeline)):
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"  {name:34s} {wall:7.2f} s {wall / n * 1e3:6.1f} ms/case {cpu:7.2f} s {cpu / n * 1e3:6.1f} ms/case")
    wall_ratio = min(r[0] for r in pipeline) / min(r[0] for r in forward)
    cpu_ratio = min(r[1] for r in pipeline) / min(r[1] for r in forward)
    print(f"  {'end_to_end / forward':34s} {wall_ratio:7.2f}   {'':12s} {cpu_ratio:7.2f}     (goal <= 1.3; CPU time "
          f"is the steadier on a shared machine)")
    print(f"  all repeats (wall): forward {', '.join(f'{r[0]:.2f}' for r in forward)} s; "
          f"end to end {', '.join(f'{r[0]:.2f}' for r in pipeline)} s")
    start = time.perf_counter()
    load_model(str(checkpoint), torch.device("cpu"))
    load_seconds = time.perf_counter() - start
    steps = step_seconds(loaded, cases, args.batch_size, work / "steps")
    print("  where end to end goes (the steps of predict_case timed one by one, ms/case; the rest is checkpoint "
          "loading and summaries):")
    for name, seconds in steps.items():
        print(f"    {name:40s} {seconds / len(cases) * 1e3:7.1f} ms/case")
    print(f"    {'sum of steps':40s} {sum(steps.values()) / len(cases) * 1e3:7.1f} ms/case")
    print(f"    {'(load checkpoint, once per run)':40s} {load_seconds / len(cases) * 1e3:7.1f} ms/case")


def memory(args: argparse.Namespace, work: Path) -> None:
    import numpy as np

    shape, window = tuple(args.rss_shape), tuple(args.rss_window)
    checkpoint = random_checkpoint(work / "big_3d.pt", window)
    volume = synthetic_volume(work / "big.nii", shape)
    voxels = int(np.prod(shape))
    windows = _window_count(shape, window, args.rss_overlap)
    print(f"(a) peak RSS of `seg-transfer predict --device cpu` on a {'x'.join(map(str, shape))} float32 volume "
          f"({voxels * 4 / GB:.2f} GB), windows {'x'.join(map(str, window))} at overlap {args.rss_overlap} "
          f"({windows} windows), 3 classes, {args.threads} thread(s)")
    print(f"  {'windows per forward':>20s} {'peak RSS':>10s} {'wall':>8s}")
    for batch_size in args.rss_batch_sizes:
        peak, seconds = predict_rss(checkpoint, volume, work / f"out_{batch_size}", batch_size, args.rss_overlap, args.threads)
        print(f"  {batch_size:20d} {peak / GB:8.2f} GB {seconds:7.0f} s   (goal <= 4 GB)")
    print(f"  one forward + softmax of B windows of {'x'.join(map(str, window))}: RSS above the RSS before it")
    for batch_size, extra in activation_peaks(checkpoint, window, sorted({1, 4, *args.rss_batch_sizes})):
        print(f"  {batch_size:20d} {extra / GB:8.2f} GB")
    if not args.stages:
        return
    command = [sys.executable, __file__, "--_stages", str(checkpoint), str(volume), str(work),
               str(args.rss_batch_sizes[0]), str(args.rss_overlap)]
    _, _, output = child_peak_rss(command, args.threads)  # its rusage peak is meaningless: the child resets VmHWM
    rows = json.loads(output.strip().splitlines()[-1])
    print(f"  steps of predict_case (batch {args.rss_batch_sizes[0]}): peak RSS within the step, RSS after it")
    print(f"  {'step':38s} {'peak':>8s} {'after':>8s} {'time':>7s}")
    for row in rows:
        print(f"  {row['step']:38s} {row['peak'] / GB:6.2f} GB {row['after'] / GB:6.2f} GB {row['seconds']:6.1f} s")
    print(f"  {'highest':38s} {max(r['peak'] for r in rows) / GB:6.2f} GB")
    print(f"  sizes: volume float32 {voxels * 4 / GB:.2f} GB, probabilities 3 x float32 {3 * voxels * 4 / GB:.2f} GB, "
          f"arg-max int64 {voxels * 8 / GB:.2f} GB, label map uint8 {voxels / GB:.2f} GB")


def activation_peaks(checkpoint: Path, window: tuple[int, int, int], batch_sizes: list[int]) -> list[tuple[int, float]]:
    """Peak RSS above the RSS before one forward + softmax of ``b`` random windows, for each ``b``, in this process."""
    import torch

    from seg_transfer.routes.network import load_network

    model = load_network(checkpoint).model
    peaks = []
    for batch_size in batch_sizes:
        batch = torch.randn(batch_size, 1, *window)
        _reset_peak()
        before = _status_bytes("VmRSS")
        with torch.no_grad():
            torch.softmax(model(batch), 1)
        peaks.append((batch_size, _status_bytes("VmHWM") - before))
    return peaks


def _window_count(shape, window, overlap: float) -> int:
    from monai.inferers.utils import _get_scan_interval
    from monai.data.utils import dense_patch_slices

    roi = [min(w, s) for w, s in zip(window, shape)]
    return len(dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, 3, (overlap,) * 3)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_stages":  # child of (a): one line of JSON
        checkpoint, volume, out, batch_size, overlap = sys.argv[2:7]
        print(json.dumps(stage_breakdown(checkpoint, volume, out, int(batch_size), float(overlap))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the children (default 1)")
    parser.add_argument("--skip-rss", action="store_true", help="skip (a), the peak-RSS measurement")
    parser.add_argument("--skip-ratio", action="store_true", help="skip (b), end to end vs forward only")
    parser.add_argument("--rss-shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                        help="synthetic volume for (a) (default 512 512 300)")
    parser.add_argument("--rss-window", type=int, nargs=3, default=(128, 128, 64), metavar=("X", "Y", "Z"),
                        help="sliding window for (a); multiples of 8 (default 128 128 64)")
    parser.add_argument("--rss-overlap", type=float, default=0.25, help="sliding-window overlap for (a) (default 0.25)")
    parser.add_argument("--rss-batch-sizes", type=int, nargs="+", default=(1,),
                        help="windows per forward for (a), one child each (default 1; predict's default is 32)")
    parser.add_argument("--stages", action="store_true",
                        help="(a) also per step of predict_case: peak RSS within each (one more child, as long)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="images for (b) (default: Hippocampus imagesTs)")
    parser.add_argument("--limit", type=int, default=20, help="first N cases for (b) (default 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward for (b) (default 32, predict's)")
    parser.add_argument("--repeat", type=int, default=2, help="timing repeats for (b), best counts (default 2)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="predict_3d_") as tmp:
        if not args.skip_rss:
            memory(args, Path(tmp))
        if not args.skip_ratio:
            time_ratio(args, Path(tmp))


if __name__ == "__main__":
    main()
