"""``medfed predict``, ``medfed explain`` and ``medfed clinical-report``.

Registered on the main CLI by :func:`register_clinical_commands`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from federation.console import console
from server.run_outputs import RunOutputs

if TYPE_CHECKING:  # torch and MONAI are imported by the commands that use them, not by `medfed --help`
    from federation.inference import InputImage
    from federation.inference.predict import Prediction

logger = logging.getLogger(__name__)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="A finished run directory (or its export/ folder).")]
InputOpt = Annotated[Path, typer.Option("--input", "-i", help="A DICOM, PNG/JPEG or .npz file, or a folder of them.")]
SplitOpt = Annotated[str, typer.Option("--npz-split", help=".npz inputs: use <split>_images when there is no 'images'.")]
LimitOpt = Annotated[int, typer.Option("--limit", help="Use only the first N inputs (0 = all).")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _load(model: Path, inputs: Path, npz_split: str, limit: int) -> tuple[object, dict, list[InputImage]]:
    from federation.inference import Preprocessing, load_exported, load_inputs  # noqa: PLC0415

    try:
        module, meta = load_exported(model)
        items = load_inputs(inputs, Preprocessing.from_dict(meta["preprocessing"]), npz_split=npz_split)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(str(err))
        raise  # unreachable: _fail exits
    return module, meta, items[:limit] if limit > 0 else items


def _table(predictions: list[Prediction], meta: dict) -> Table:
    names = meta.get("label_names") or []
    positive = int(meta.get("positive_class", 1))
    table = Table(title=f"P({names[positive] if positive < len(names) else positive}) per input, "
                        f"threshold {meta.get('threshold', 0.5)}")
    for column in ("input", "P(positive)", "positive", "predicted"):
        table.add_column(column)
    for pred in predictions:
        label = names[pred.predicted_class] if pred.predicted_class < len(names) else str(pred.predicted_class)
        table.add_row(pred.name, f"{pred.p_positive:.4f}", "yes" if pred.positive else "no", label)
    return table


def predict_command(
    model: ModelOpt,
    input_path: Annotated[
        Optional[Path], typer.Option("--input", "-i", help="A DICOM, PNG/JPEG or .npz file, or a folder of them.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write per-image probabilities to this CSV "
        "(a segmentation run: a folder for one NIfTI mask per input + volumes.csv).")] = None,
    gradcam: Annotated[
        Optional[Path],
        typer.Option("--gradcam", help="Also write explanation overlays (as medfed explain) into this folder."),
    ] = None,
    npz_split: SplitOpt = "test",
    limit: LimitOpt = 0,
    pacs: Annotated[
        Optional[Path], typer.Option("--pacs", help="The site's PACS YAML: predict its cohort and store a DICOM SR "
                                     "per series back into the PACS (research output, not for clinical use).")
    ] = None,
    pacs_cache: Annotated[
        Optional[Path], typer.Option("--pacs-cache", help="Cohort cache folder (default: the YAML's cache_dir).")
    ] = None,
) -> None:
    """Run a run's exported model on images, preprocessed exactly as in training."""
    from federation.inference import load_run_model, predict_inputs, write_predictions_csv  # noqa: PLC0415
    from federation.inference.predict import explain_inputs  # noqa: PLC0415

    if pacs is not None:
        _predict_pacs(model, pacs, pacs_cache, limit=limit, out=out)
        return
    if input_path is None:
        _fail("give --input (files or a folder) or --pacs SITE.yaml")
        return
    if _is_segmentation_run(model):
        if _spatial_dims(model) == 2:  # a 2-D segmentation model: one DICOM SEG per series of the input images
            _predict_dicom_seg(model, input_path, out, limit=limit)
        else:
            _predict_nifti(model, input_path, out, limit=limit)
        return
    module, meta, items = _load(model, input_path, npz_split, limit)
    predictions = predict_inputs(module, items, meta=meta)  # type: ignore[arg-type]
    overlays = None
    if gradcam is not None:
        network, _ = load_run_model(model)
        overlays = explain_inputs(network, items, predictions, gradcam, meta=meta)
    if out is not None:
        write_predictions_csv(predictions, out, meta=meta, overlays=overlays)
        console.print(f"[green]{len(predictions)} predictions[/] → {out}")
    else:
        console.print(_table(predictions, meta))
    if gradcam is not None:
        console.print(f"explanation overlays → {gradcam}")


def _is_segmentation_run(model: Path) -> bool:
    from federation.inference import read_export_meta  # noqa: PLC0415

    try:
        return read_export_meta(model).get("task") == "segmentation"
    except (FileNotFoundError, ValueError):
        return False  # _load names the problem


def _predict_nifti(model: Path, input_path: Path, out: Optional[Path], *, limit: int) -> None:
    """``predict`` with a segmentation run: one NIfTI mask per input in ``--out`` and ``volumes.csv``."""
    from federation.inference import load_exported  # noqa: PLC0415
    from federation.inference.nifti_predict import (  # noqa: PLC0415
        PAD_CROP_DATASETS,
        list_nifti_inputs,
        predict_nifti,
        write_volumes_csv,
    )

    if out is None:
        _fail("a segmentation model writes one mask per input: give --out DIR")
        return
    try:
        module, meta = load_exported(model)
        shape = tuple(int(v) for v in meta["preprocessing"].get("volume_shape") or ())
        if len(shape) != 3:
            raise ValueError(f"--model {model}: predicting NIfTI masks needs a 3-D segmentation model "
                             f"(its export has no 3-D volume_shape)")
        if meta.get("dataset") not in PAD_CROP_DATASETS:
            console.print(f"[yellow]warning:[/] the model was trained on {meta.get('dataset')!r} volumes, which "
                          "were not padded/cropped as NIfTI inputs are here; check its masks", soft_wrap=True)
        inputs = list_nifti_inputs(input_path)
        results = predict_nifti(module, inputs[:limit] if limit > 0 else inputs, root=input_path, out_dir=out,
                                volume_shape=shape)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(str(err))
        return
    table = write_volumes_csv(results, out / "volumes.csv", label_names=meta.get("label_names") or [])
    failed = [r for r in results if r.error is not None]
    for r in failed:
        where = input_path if input_path.is_file() else input_path / r.name
        console.print(f"[bold red]error:[/] {where}: {r.error}", soft_wrap=True, markup=True, highlight=False)
    console.print(f"[green]{len(results) - len(failed)} mask(s)[/] → {out}, volumes → {table}"
                  + (f"; [red]{len(failed)} input(s) failed[/]" if failed else ""), soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


def _predict_dicom_seg(model: Path, input_path: Path, out: Optional[Path], *, limit: int) -> None:
    """``predict`` with a 2-D segmentation run on DICOM files: one DICOM SEG per series in ``--out``."""
    from federation.inference.writeback import file_segmentations  # noqa: PLC0415

    if out is None:
        _fail("a segmentation model writes one DICOM SEG per series: give --out DIR")
        return
    module, meta, items = _load(model, input_path, "test", limit)
    root = input_path if input_path.is_dir() else input_path.parent
    segs, skipped = file_segmentations(root=root, module=module, inputs=items, meta=meta)
    out.mkdir(parents=True, exist_ok=True)
    for seg in segs:
        path = out / f"seg-{seg.SeriesInstanceUID}.dcm"
        seg.save_as(path)
        console.print(f"wrote {path} (DICOM SEG of {len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence)} "
                      f"image(s), research output, not for clinical use)", soft_wrap=True)
    for name, why in skipped.items():
        console.print(f"[red]{input_path / name if input_path.is_dir() else input_path}: no SEG written: {why}[/]",
                      soft_wrap=True)
    if skipped:
        raise typer.Exit(code=1)


def _predict_pacs(model: Path, pacs: Path, cache: Optional[Path], *, limit: int, out: Optional[Path]) -> None:
    """``predict --pacs``: retrieve the cohort, predict each image (a 3-D model: each series as a volume),
    store one SR (classification) or SEG (segmentation) per series into the PACS."""
    from federation.data.dicom.pacs import PacsError, connect, load_pacs_config, sync_cohort  # noqa: PLC0415
    from federation.data.dicom.pacs_report import default_cache_dir  # noqa: PLC0415
    from federation.inference import predict_inputs, write_predictions_csv  # noqa: PLC0415
    from federation.inference.predict import predict_probabilities  # noqa: PLC0415
    from federation.inference.writeback import cohort_reports, cohort_segmentations  # noqa: PLC0415

    try:
        config = load_pacs_config(pacs)
        client = connect(config)
        synced = sync_cohort(config, cache_dir=default_cache_dir(config, cache), labelled_only=False, client=client)
    except (PacsError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
        return
    if _spatial_dims(model) == 3:  # a volume model: one report per series, the series as one volume
        _predict_pacs_volumes(model, config, client, synced.cache_dir, out=out)
        return
    module, meta, items = _load(model, synced.cache_dir, "test", limit)
    if items and predict_probabilities(module, items[0].image[None]).ndim == 4:  # a segmentation model: DICOM SEG
        reports, predictions = cohort_segmentations(cache_dir=synced.cache_dir, module=module, inputs=items,
                                                    meta=meta), []
        kind = "DICOM SEG"
    else:
        predictions = predict_inputs(module, items, meta=meta)  # type: ignore[arg-type]
        reports = cohort_reports(cache_dir=synced.cache_dir, predictions=predictions, meta=meta)
        kind = "DICOM SR"
    _store_pacs_reports(config, client, reports)
    if out is not None and predictions:  # per-image probabilities of a classification model
        write_predictions_csv(predictions, out, meta=meta)
    console.print(f"[green]{len(reports)} research report(s)[/] ({kind}, not for clinical use) stored in PACS "
                  f"{config.address} for {len(items)} image(s) of {len(synced.series)} series")


def _spatial_dims(model: Path) -> int:
    from federation.inference import read_export_meta  # noqa: PLC0415

    try:
        return int((read_export_meta(model).get("preprocessing") or {}).get("spatial_dims", 2))
    except (FileNotFoundError, ValueError):
        return 2  # _load names the problem


def _store_pacs_reports(config: object, client: object, reports: list) -> None:
    """Store the research reports (STOW-RS or C-STORE); a failing PACS is an error naming it."""
    from federation.data.dicom.pacs import PacsError, pacs_errors  # noqa: PLC0415
    from federation.inference.writeback import store_reports  # noqa: PLC0415

    try:
        with pacs_errors(config, f"store the research reports ({'C-STORE' if config.dimse else 'STOW-RS'})"):
            store_reports(client, reports)
    except PacsError as err:
        _fail(str(err))


def _predict_pacs_volumes(model: Path, config: object, client: object, cache: Path, *, out: Optional[Path]) -> None:
    """``predict --pacs`` with a 3-D model: each cached series one volume, one SR or SEG per series."""
    import csv  # noqa: PLC0415

    from federation.inference import load_exported  # noqa: PLC0415
    from federation.inference.volume_writeback import cohort_volume_reports  # noqa: PLC0415

    try:
        module, meta = load_exported(model)
        result = cohort_volume_reports(cache_dir=cache, module=module, meta=meta)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(str(err))
        return
    _store_pacs_reports(config, client, result.reports)
    for uid, reason, detail in result.set_aside:
        console.print(f"[yellow]set aside[/] series {uid}: {reason} ({detail})", soft_wrap=True, highlight=False)
    if out is not None and result.rows:
        with open(out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result.rows[0]))
            writer.writeheader()
            writer.writerows(result.rows)
    kind = "DICOM SEG" if result.rows and "voxels_per_class" in result.rows[0] else "DICOM SR"
    console.print(f"[green]{len(result.reports)} research report(s)[/] ({kind}, not for clinical use) stored in PACS "
                  f"{config.address} for {len(result.rows)} series as volumes, {len(result.set_aside)} set aside")


def explain_command(
    model: ModelOpt,
    input_path: InputOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the overlay PNGs (and predictions.csv).")],
    class_index: Annotated[
        Optional[int], typer.Option("--class", help="Class whose evidence is shown (default: the predicted class).")
    ] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Grad-CAM layer (default: the last convolution).")] = None,
    npz_split: SplitOpt = "test",
    limit: LimitOpt = 0,
    method: Annotated[
        Optional[str],
        typer.Option("--method", help="integrated_gradients (default), occlusion, or gradcam (default with --layer)."),
    ] = None,
) -> None:
    """Write explanation overlays (image beside map, colour bar) with the predicted probability on each image."""
    from federation.inference import load_run_model, predict_inputs, write_predictions_csv  # noqa: PLC0415
    from federation.inference.attribution import DEFAULT_ATTRIBUTION  # noqa: PLC0415
    from federation.inference.predict import explain_inputs  # noqa: PLC0415

    chosen = method or ("gradcam" if layer is not None else DEFAULT_ATTRIBUTION)
    module, meta, items = _load(model, input_path, npz_split, limit)
    predictions = predict_inputs(module, items, meta=meta)  # type: ignore[arg-type]
    try:
        network, _ = load_run_model(model)
        overlays = explain_inputs(network, items, predictions, out, meta=meta, class_index=class_index,
                                  target_layer=layer, method=chosen)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
        return
    write_predictions_csv(predictions, out / "predictions.csv", meta=meta, overlays=overlays)
    console.print(f"[green]{len(overlays)} {chosen} overlays[/] → {out}")


def clinical_report_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
) -> None:
    """(Re)write a run's export/, clinical/ report and model card from its records."""
    from server.model_card import finish_run

    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} holds no config.yaml; is it a medfed run directory?")
    announce_outputs(finish_run(run_dir))


def simulation_gallery(run_dir: Path, outputs: RunOutputs) -> list[Path]:
    """Simulation only: the task's gallery of every simulated site (Grad-CAM, contours), added to the clinical report.

    Recorded in ``outputs`` under the gallery's name, as written or failed with its
    reason; returns the panels written (none for a task without a gallery).
    """
    from federation.config import load_config
    from server.run_dir import CONFIG_FILE
    from simulations.gallery import gallery_for

    config = load_config(run_dir / CONFIG_FILE)
    gallery = gallery_for(config.data.task)
    if gallery is None:
        return []
    return outputs.produce(gallery.output, lambda: gallery.write(run_dir, config=config))


def announce_outputs(outputs: RunOutputs, *, exit_on_failure: bool = True) -> None:
    """Print each end-of-run output that exists; name each that failed, with its reason.

    Args:
        outputs: The run's output record.
        exit_on_failure: Exit with status 1 after the listing when an output failed.
    """
    for name, paths in outputs.written().items():
        shown = ", ".join(str(p) for p in paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
        console.print(f"{name}: {shown}")
    problem = outputs.failure_message()
    if problem is not None:
        console.print(f"[bold red]error:[/] {problem}")
        if exit_on_failure:
            raise typer.Exit(code=1)


def register_clinical_commands(app: typer.Typer) -> None:
    """Add ``predict``, ``explain`` and ``clinical-report`` to the ``medfed`` CLI."""
    app.command("predict")(predict_command)
    app.command("explain")(explain_command)
    app.command("clinical-report")(clinical_report_command)
