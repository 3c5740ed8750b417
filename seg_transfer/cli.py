"""``seg-transfer`` command line: thin wrappers over library functions."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from seg_transfer.errors import UserError

# plain click help: no rich import on --help, and flags are not rendered as ``--help <bool>``
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": 120}, help="Transfer learning for medical image segmentation.")
log = logging.getLogger("seg_transfer.cli")

def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("PIL", "matplotlib", "h5py", "urllib3", "httpx", "httpcore", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_libraries(verbose)


def _quiet_libraries(verbose: bool) -> None:
    """Library warnings (torch/MONAI ``FutureWarning``s, ITK's on a folder that is not a DICOM series) go to
    the log at debug level, not to the terminal; ``-v`` shows them."""
    import warnings

    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(verbose)
    warnings.showwarning = _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").debug("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory (default: output_dir/name).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder from its last checkpoint.")] = False,
    skip_bad_cases: Annotated[bool, typer.Option("--skip-bad-cases", help="Train on the good cases; record the bad ones.")] = False,
    stop_on_collapse: Annotated[bool, typer.Option("--stop-on-collapse", help="End the run (exit 3) when a class's validation Dice stays near zero once the encoder trains (training.collapse).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a segmentation model (staged fine-tuning as the config says)."""
    _setup_logging(verbose)
    from seg_transfer.atomic import check_writable
    from seg_transfer.config import load_config
    from seg_transfer.training.trainer import train as run_training

    overrides = [*(set_ or []), *(["training.collapse.stop=true"] if stop_on_collapse else [])]
    run_config = load_config(config, overrides)
    run_dir = Path(output) if output is not None else run_config.output_dir / run_config.name
    check_writable(run_dir, folder=True, option="--output" if output is not None else "run folder")
    with _removed_if_failed(run_dir):
        result = run_training(run_config, output, resume=resume, skip_bad_cases=skip_bad_cases)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    per_class = ", ".join(f"{name} {value:.3f}" for name, value in result.best_per_class.items())
    typer.echo(f"best validation Dice {result.best_dice:.3f} ({per_class}) at epoch {result.best_epoch}, "
               f"{result.steps} steps; run: {result.run_dir}")
    if result.collapsed:
        typer.echo(f"warning: class(es) {', '.join(result.collapsed)} below the collapse threshold "
                   f"{run_config.training.collapse.min_class_dice} at the best epoch", err=True)
    if result.stopped == "collapse":
        typer.echo("stopped early: a class collapsed once the encoder trained (see summary.json: collapse_warnings)", err=True)
        raise typer.Exit(3)


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config: its data preprocessing, network and starting weights (model.encoder_weights); settings under pretraining.")],
    images: Annotated[list[Path] | None, typer.Option("--images", help="Folder of unlabelled scans (repeatable). Default: the imagesTs of the MSD dataset at data.root.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for pretrained.pt and pretraining.json.")] = Path("runs/pretrained"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable), e.g. pretraining.steps=300.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Self-supervised restoration pretraining on unlabelled scans (2.5D slabs or 3D patches); its encoder (and, with
    model.decoder_from_weights, its decoder) then seeds fine-tuning."""
    _setup_logging(verbose)
    from seg_transfer.atomic import check_writable
    from seg_transfer.config import load_config
    from seg_transfer.data.pipeline import unlabelled_scans
    from seg_transfer.training.restoration import pretrain as run_pretraining

    run_config = load_config(config, set_ or [])
    check_writable(output, folder=True)
    result = run_pretraining(run_config, unlabelled_scans(run_config.data, images or []), output)
    after, before = result.summary["held_out_after"], result.summary["held_out_before"]
    if after is not None:
        typer.echo(f"held-out restoration MSE {before['network_mse']:.3f} -> {after['network_mse']:.3f} "
                   f"(corrupted input: {after['corrupted_input_mse']:.3f}), {result.summary['steps']} steps in "
                   f"{result.summary['seconds'] / 60:.1f} min")
    typer.echo(f"weights: {result.weights}; fine-tune with --set model.encoder_weights={result.weights}")


@app.command()
def quickstart(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the phantom data and both runs.")] = Path("seg_transfer_quickstart"),
    epochs_scale: Annotated[float, typer.Option(help="Multiply every stage's epochs (tests use < 1).")] = 1.0,
    dims: Annotated[str, typer.Option(help="Route: 2.5d (slices with neighbours) or 3d (ImageNet kernels inflated "
                                           "to 3D, patches, sliding window).")] = "2.5d",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Phantom data → ImageNet-pretrained staged fine-tuning and a scratch control; prints both Dice scores."""
    _setup_logging(verbose)
    from seg_transfer.quickstart import run_quickstart

    report = run_quickstart(output, epochs_scale=epochs_scale, dims=dims)
    typer.echo(report)


@app.command()
def encoders(
    all_: Annotated[bool, typer.Option("--all", help="Also list every encoder name smp and timm know.")] = False,
) -> None:
    """Encoders whose ImageNet weights are available on this machine now, and where each comes from."""
    from seg_transfer.models.weights import available_imagenet_encoders, weights_dir

    found = available_imagenet_encoders()
    typer.echo(f"ImageNet weights available offline ({len(found)}); local weights dir: {weights_dir()}")
    for encoder, source, path in found:
        typer.echo(f"  {encoder:32s} {source:45s} {path}")
    if all_:
        import segmentation_models_pytorch as smp
        import timm

        typer.echo("smp encoders: " + ", ".join(smp.encoders.get_encoder_names()))
        typer.echo(f"timm encoders (as tu-<name>): {len(timm.list_models())}, e.g. " + ", ".join(timm.list_models()[:20]))


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted label maps (matched to references by file name).")],
    label: Annotated[Path, typer.Option("--label", help="Folder of reference label maps.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for metrics.csv, metrics.json, summary.md (default: PRED/evaluation).")] = None,
    tolerance_mm: Annotated[float, typer.Option("--tolerance-mm", help="Normalised surface Dice tolerance in mm.")] = 2.0,
    labels: Annotated[Path | None, typer.Option("--labels", help="dataset.json or JSON label map naming the classes (default: the names predict wrote beside PRED, or dataset.json beside LABEL, else class_1..class_K).")] = None,
    skip_bad_cases: Annotated[bool, typer.Option("--skip-bad-cases", help="Score the cases that can be scored and list the others (unreadable, not a label map, other geometry) in the summary; exit code 1 if any was left out. Default: stop, listing every bad case.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Per-case Dice, HD95, ASSD, surface Dice and volume difference, with per-class aggregates and bootstrap CIs."""
    _setup_logging(verbose)
    from seg_transfer.evaluation.evaluate import evaluate_folders

    result = evaluate_folders(pred, label, output, tolerance_mm=tolerance_mm, labels=labels, skip_bad_cases=skip_bad_cases)
    for entry in result.aggregates:
        m = entry["metrics"]
        typer.echo(f"{entry['class_name']}: Dice {m['dice']['mean']:.4f}, HD95 {m['hd95_mm']['mean']:.2f} mm "
                   f"({m['hd95_mm']['n_missing']} missing), NSD@{tolerance_mm:g}mm {m['nsd']['mean']:.4f}")
    left_out = f"; {len(result.failed)} left out (listed in {result.files['markdown'].name})" if result.failed else ""
    typer.echo(f"{len(result.cases)} cases{left_out}; results: {result.files['markdown'].parent}")
    if result.failed:
        raise typer.Exit(1)


@app.command()
def predict(
    model: Annotated[list[str], typer.Option("--model", "-m", metavar="RUN_OR_CKPT", help="Checkpoint file or run directory (uses checkpoints/best.pt). Repeat for an ensemble: each model's probabilities are mapped to the input grid and averaged (members may mix routes and preprocessing; same classes).")],
    input_: Annotated[str, typer.Option("--input", "-i", help="A volume, a folder, a glob, a .txt/.csv list of paths, or a DICOM folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for label maps and the summary.")],
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices (2.5D) or sliding windows (3D) per forward pass, capped by voxels.")] = 32,
    amp: Annotated[bool, typer.Option("--amp", help="CUDA autocast (bfloat16 where supported, else float16, as training); ignored on CPU.")] = False,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Average the probabilities over the flips the network was trained with (data.augment.flip_axes, every combination; 2 passes for the shipped configs). Default: as chosen on the run's validation cases at the end of training (TTA where it scored higher; TTA for checkpoints without that record). --tta / --no-tta force it; --no-tta predicts in half the time.")] = None,
    roi_size: Annotated[int, typer.Option("--roi-size", help="2.5D: slices with a side larger than this use sliding windows of this size (3D: windows are the training patch).")] = 512,
    overlap: Annotated[float | None, typer.Option("--overlap", help="Sliding-window overlap (Gaussian blending); default 0.25 in 2.5D, 0.5 in 3D.")] = None,
    postprocess: Annotated[str, typer.Option("--postprocess", help="none, or largest-component (per class).")] = "none",
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write <case>_probabilities (float32, one component per class).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="nii.gz, nrrd, mha, or dicom-seg (DICOM inputs; needs the 'dicom' extra).")] = "nii.gz",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases whose output already exists.")] = False,
    num_parts: Annotated[int, typer.Option("--num-parts", help="Split the sorted case list into N shards...")] = 1,
    part_id: Annotated[int, typer.Option("--part-id", help="...and predict shard K (0-based).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Predict label maps in each input's exact geometry; writes summary.csv/json. Exit code 1 if any case failed."""
    _setup_logging(verbose)
    from seg_transfer.atomic import check_writable
    from seg_transfer.inference.batch import PredictRequest, run_predict
    from seg_transfer.inference.predictor import PredictOptions

    check_writable(output, folder=True)
    options = PredictOptions(batch_size=batch_size, amp=amp, tta=tta, roi_size=roi_size, overlap=overlap,
                             postprocess=postprocess, save_probabilities=save_probabilities)
    report = run_predict(PredictRequest(tuple(model), input_, output, fmt, device, options, overwrite, resume, num_parts, part_id))
    carried = sum(r.carried_over for r in report.results)
    earlier = f" ({carried} by an earlier run, kept by --continue)" if carried else ""
    typer.echo(f"{report.count('ok')} predicted{earlier}, {report.count('skipped')} skipped, {len(report.failed)} failed "
               f"in {report.wall_seconds:.1f} s; summary: {report.csv_path}")
    for result in report.failed:
        typer.echo(f"failed: {result.case}: {result.reason}", err=True)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint file or run directory (uses checkpoints/best.pt).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write; its input contract goes to OUTPUT.json.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (needs the 'export' extra).")] = "onnx",
    size: Annotated[int, typer.Option("--size", help="Slice side to trace and check; a multiple of the encoder stride.")] = 256,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (11-20).")] = 17,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest accepted |onnxruntime - torch| of the logits.")] = 1e-3,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export the network (dynamic batch/height/width) and check it against onnxruntime; writes OUTPUT.json beside it."""
    _setup_logging(verbose)
    from seg_transfer.atomic import check_writable
    from seg_transfer.inference.export import (
        ExportError,
        contract_path_for,
        export_checkpoint,
    )

    if fmt.lower() != "onnx":
        raise ExportError(f"--format {fmt!r}: only onnx is supported")
    check_writable(output, folder=False)  # before tracing and the onnxruntime check
    check_writable(contract_path_for(output), folder=False, option="--output (contract)")
    result = export_checkpoint(model, output, size=size, opset=opset, tolerance=tolerance)
    spec = result.contract["input"]
    spatial = f"H, W multiples of {spec['spatial_multiple']}" if result.dynamic_spatial else f"fixed {size}x{size}"
    typer.echo(f"exported {result.model_path} (opset {opset}; {spec['name']} [batch, {spec['channels']}, H, W], {spatial})")
    typer.echo(f"onnxruntime vs torch max abs difference {result.max_abs_diff:.3g} (tolerance {tolerance:g}); "
               f"contract: {result.contract_path}")


@app.command()
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="Study YAML (base run config, arms, train_sizes, seeds).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Study folder: runs/, test_cases/, report.md/.html, results.json.")],
    device: Annotated[str, typer.Option("--device", help="Device for test-case prediction: auto, cpu, cuda or cuda:N.")] = "auto",
    max_runs: Annotated[int | None, typer.Option("--max-runs", min=0, help="Train at most N new runs now, then report (spread a study over jobs).")] = None,
    shard: Annotated[str, typer.Option("--shard", help="I/N: train only every N-th run from the I-th (0-based), so N processes share one study folder.")] = "0/1",
    processes: Annotated[int, typer.Option("--processes", min=1, help="Train N runs at once in parallel processes on this machine (one GPU or several cores; each takes the next run when free), then report; logs in OUTPUT/logs.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Transfer study: arms x training-set sizes x seeds, paired comparison with the control, report. Resumable."""
    _setup_logging(verbose)
    from seg_transfer.study.compare import compare as run_compare
    from seg_transfer.study.report import findings

    outcome = run_compare(config, output, device=device, max_runs=max_runs, shard=_parse_shard(shard), processes=processes)
    progress = outcome.progress
    typer.echo(f"{len(progress.records)} of {progress.total_runs} runs finished")
    for line in findings(outcome.results):
        typer.echo(line)
    if "markdown" in outcome.files:
        typer.echo(f"report: {outcome.files['markdown']} and {outcome.files['html']}")
    elif outcome.files:
        typer.echo(f"no run finished yet; the study's cases and training subsets: {outcome.files['json']}")
    for failed in outcome.failed_runs:
        typer.echo(f"error: run {failed}; it is missing from the report", err=True)
    if outcome.failed_runs:
        raise typer.Exit(1)


@app.command("rank-encoders")
def rank_encoders(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML run config (its training cases and preprocessing).")],
    candidates: Annotated[str, typer.Option("--candidates", help="Comma-separated encoder:weights[:inflation], weights imagenet, none or a file, e.g. tu-tf_efficientnet_lite0:imagenet.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a run-config key: key.path=value (repeatable).")] = None,
    pixels: Annotated[int, typer.Option("--pixels", min=1, help="Class-balanced pixels sampled per training case.")] = 1000,
    strides: Annotated[str | None, typer.Option("--strides", help="Feature-map strides to score, e.g. 4,8,16 (one row each); default: the route's, 16 in 2.5D, 8 in 3D.")] = None,
    max_cases: Annotated[int | None, typer.Option("--max-cases", min=1, help="Use only the first N training cases (default: all).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for ranking.json and ranking.md.")] = Path("runs/rank_encoders"),
    seed: Annotated[int, typer.Option("--seed", help="Pixel sampling seed.")] = 0,
    scores: Annotated[str | None, typer.Option("--scores", help="Comma-separated transferability scores: logme, gbc, variety, cc, ccfv; the first orders the ranking; default: the route's, logme in 2.5D, variety in 3D.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "cpu",
    skip_bad_cases: Annotated[bool, typer.Option("--skip-bad-cases", help="Use the good cases; ignore the bad ones.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rank candidate encoders for a run config by LogME (or GBC) on its training pixels, before any fine-tuning."""
    _setup_logging(verbose)
    from seg_transfer.config import load_config
    from seg_transfer.selection.rank import (
        RankOptions,
        format_table,
        parse_candidates,
        parse_strides,
    )
    from seg_transfer.selection.rank import rank_encoders as run_ranking

    options = RankOptions(pixels=pixels, strides=None if strides is None else parse_strides(strides), seed=seed,
                          device=device, max_cases=max_cases, skip_bad_cases=skip_bad_cases,
                          scores=None if scores is None else tuple(name.strip() for name in scores.split(",") if name.strip()))
    chosen = parse_candidates(candidates)
    ranking = run_ranking(load_config(config, set_ or []), chosen, output, options)
    typer.echo(format_table(ranking))
    typer.echo(f"{len(ranking.cases)} training cases; ranking: {ranking.files['json']} and {ranking.files['markdown']}")


def _parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` as (I, N) with 0 <= I < N; BadParameter otherwise."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise typer.BadParameter(f"expected I/N with 0 <= I < N, got {text!r}", param_hint="--shard")
    return int(parts[0]), int(parts[1])


#: what a run writes before its first checkpoint: a new run folder holding only these is removed when training fails
EARLY_RUN_FILES = frozenset({"config.yaml", "splits.json", "skipped_cases.json", "metrics.jsonl", "metrics.csv"})


@contextmanager
def _removed_if_failed(run_dir: Path) -> Iterator[None]:
    """Remove the run folder (and parents) this invocation creates if training fails before any checkpoint.

    A folder that existed before is never touched; one holding any other file (a checkpoint) is kept."""
    created = _first_missing(run_dir)
    try:
        yield
    except BaseException:
        if created is not None and os.environ.get("RANK", "0") == "0":
            _remove_early_run(run_dir, created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()]
    return missing[-1] if missing else None


def _is_early_run_file(relative: Path) -> bool:
    name = relative.name
    return (str(relative) in EARLY_RUN_FILES or relative.parts[0] == "tensorboard"
            or (name.startswith(".") and name.endswith(".tmp")))


def _remove_early_run(run_dir: Path, created: Path) -> None:
    run_dir = run_dir.absolute()
    if not run_dir.is_dir():
        return
    files = [p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.is_dir()]
    if not all(_is_early_run_file(f) for f in files):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:  # parents this invocation created, while empty
        if not parent.is_relative_to(created):
            break
        try:
            parent.rmdir()
        except OSError:
            break
    log.info("removed %s: the run failed before its first checkpoint", run_dir)


def _click_exceptions() -> tuple[type[Exception], ...]:
    """Usage-error base classes: click's, and the copy of click that newer typer versions vendor."""
    import click

    vendored = next((c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"), click.ClickException)
    return (click.ClickException, vendored)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:
        if isinstance(exc, UserError):
            typer.echo(f"error: {exc}", err=True)
            return 2
        if isinstance(exc, _click_exceptions()):  # usage errors
            exc.show()
            return exc.exit_code
        if _verbose(argv):
            raise
        return _internal_error(exc)
    return code if isinstance(code, int) else 0


def _verbose(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "-v" in args or "--verbose" in args


def _internal_error(exc: BaseException) -> int:
    """A bug or an unforeseen failure: one line naming it and where its traceback was written; exit 1."""
    import tempfile
    import time
    import traceback

    folder = Path(tempfile.gettempdir()) / "seg_transfer"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    typer.echo(f"internal error: {type(exc).__name__}{': ' + text if text else ''} (traceback in {path}; "
               "rerun with -v to see it here)", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
