"""``medfed site ...``: check a hospital's DICOM folder, write a demo site, check its policy, read its audit log.

Mounted on the ``medfed`` front door by :func:`register_site_commands`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from client.audit import AUDIT_FILE, read_audit, render_audit, summarize_audit
from client.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from client.policy import PolicyError, load_policy
from federation.console import console
from federation.data.dicom.demo import DEMO_SOURCES
from federation.data.dicom.labels import DEFAULT_KEY_COLUMN, DEFAULT_LABEL_COLUMN

site_app = typer.Typer(
    name="site",
    help="Hospital site: check a DICOM folder and its labels, write a demo site, check the policy, read the audit log.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _split_csv(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@site_app.command("check")
def check_command(
    data_dir: Annotated[
        Optional[Path], typer.Argument(help="The site folder of DICOM files (searched recursively); omit with --pacs.")
    ] = None,
    labels: Annotated[
        Optional[Path], typer.Option("--labels", "-l", help="Labels CSV (default: DATA_DIR/labels.csv).")
    ] = None,
    key_column: Annotated[
        str, typer.Option("--key-column", help="CSV column with the SOP Instance UID or relative path "
                           "(default: sop_instance_uid, else a 'path' column).")
    ] = DEFAULT_KEY_COLUMN,
    label_column: Annotated[
        str, typer.Option("--label-column", help="CSV column with the class.")
    ] = DEFAULT_LABEL_COLUMN,
    modality: Annotated[
        Optional[list[str]], typer.Option("--modality", "-m", help="Allowed modality (repeatable or comma list).")
    ] = None,
    label_names: Annotated[
        str, typer.Option("--label-names", help="Class names in index order, comma separated.")
    ] = "",
    frames: Annotated[str, typer.Option("--frames", help="Multi-frame images: first, middle or all.")] = "first",
    headers_only: Annotated[
        bool, typer.Option("--headers-only", help="Skip decoding pixel data (faster, misses corrupt pixels).")
    ] = False,
    cache_dir: Annotated[
        Optional[Path], typer.Option("--cache-dir", help="Folder for the header index (default: DATA_DIR).")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Quarantined files listed one by one.")] = 50,
    pacs: Annotated[
        Optional[Path], typer.Option("--pacs", help="The site's PACS YAML: retrieve its cohort and check it.")
    ] = None,
    pacs_cache: Annotated[
        Optional[Path], typer.Option("--pacs-cache", help="Cohort cache folder (default: the YAML's cache_dir).")
    ] = None,
) -> None:
    """Check a site's DICOM files (or its PACS cohort) against its labels; exit 1 when nothing usable remains."""
    from federation.data.dicom import DicomReadOptions, check_site, render_site_report  # noqa: PLC0415

    if frames not in ("first", "middle", "all"):
        _fail(f"--frames must be first, middle or all, not {frames!r}")
    if pacs is not None:
        _check_pacs(pacs, pacs_cache, json_out=json_out, decode=not headers_only, max_rows=max_rows)
        return
    if data_dir is None:
        _fail("give the site folder (DATA_DIR) or --pacs SITE.yaml")
        return
    from federation.data.nifti import is_nifti_site  # noqa: PLC0415

    if is_nifti_site(data_dir):  # NIfTI segmentation data: MSD/nnU-Net folders or a cases CSV
        _check_nifti(data_dir, label_names=tuple(_split_csv([label_names])), json_out=json_out, max_rows=max_rows)
        return
    names = _split_csv([label_names]) or None
    try:
        options = DicomReadOptions(key_column=key_column, label_column=label_column,
                                   modalities=tuple(_split_csv(modality)), label_names=tuple(names or ()),
                                   frames=frames, cache_dir=cache_dir)  # type: ignore[arg-type]
        report = check_site(data_dir, labels, options=options, decode=not headers_only)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        _fail(str(exc))
        return
    console.print(render_site_report(report, max_quarantined=max_rows))
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        console.print(f"report written to {json_out}")
    if not report.ok:
        console.print("[bold red]no usable images[/]: fix the quarantined files or the labels CSV")
        raise typer.Exit(code=1)


def _check_nifti(folder: Path, *, label_names: tuple[str, ...], json_out: Optional[Path], max_rows: int) -> None:
    """Check a NIfTI folder case by case; exit 1 when no case is usable."""
    from federation.data.nifti import check_nifti_folder, render_nifti_report  # noqa: PLC0415 - MONAI: only when used

    try:
        cases, names = check_nifti_folder(folder, label_names=label_names)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    console.print(render_nifti_report(cases, label_names=names, max_rows=max_rows), markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps({"usable": cases.names, "set_aside": cases.set_aside}, indent=2),
                            encoding="utf-8")
        console.print(f"report written to {json_out}")
    if not cases.names:
        console.print("[bold red]no usable cases[/]: fix the cases set aside or the declared classes")
        raise typer.Exit(code=1)


def _check_pacs(pacs: Path, cache: Optional[Path], *, json_out: Optional[Path], decode: bool, max_rows: int) -> None:
    """``site check --pacs``: retrieve the cohort into the cache, report series and quarantine; never trains."""
    from federation.data.dicom import render_site_report  # noqa: PLC0415
    from federation.data.dicom.pacs import PacsError, load_pacs_config  # noqa: PLC0415
    from federation.data.dicom.pacs_report import check_pacs_cohort, default_cache_dir, render_cohort  # noqa: PLC0415

    try:
        config = load_pacs_config(pacs)
        report = check_pacs_cohort(config, cache_dir=default_cache_dir(config, cache), decode=decode)
    except (PacsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    console.print(render_cohort(report, url=config.address))
    if report.site is not None:
        console.print(render_site_report(report.site, max_quarantined=max_rows))
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        console.print(f"report written to {json_out}")
    if report.site is None or not report.site.ok:
        console.print("[bold red]no usable images in the cohort[/]: check the cohort query and the labels CSV")
        raise typer.Exit(code=1)


@site_app.command("make-demo")
def make_demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Site folder to create.")],
    source: Annotated[
        str, typer.Option("--from", help=f"MedMNIST flag: {', '.join(sorted(DEMO_SOURCES))}.")
    ] = "pneumoniamnist",
    count: Annotated[int, typer.Option("--count", "-n", help="Number of images.")] = 100,
    split: Annotated[str, typer.Option("--split", help="MedMNIST split: train, val or test.")] = "train",
    seed: Annotated[int, typer.Option("--seed", help="Seed of images, fake patients and UIDs.")] = 0,
    data_dir: Annotated[
        Optional[Path], typer.Option("--data-dir", help="Folder with <flag>.npz (default: $MEDFED_DATA_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder.")] = False,
) -> None:
    """Write a demo hospital site (DICOM files + labels.csv) from a MedMNIST split."""
    from federation.data.dicom import make_demo_site  # noqa: PLC0415 - only when used

    try:
        site = make_demo_site(
            source=source, data_dir_of_npz=data_dir, out_dir=out, split=split, count=count, seed=seed,
            overwrite=force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
        return
    console.print(f"[green]demo site[/] {site}: {count} {source} {split} images, labels in {site / 'labels.csv'}")
    console.print(f"check it with: medfed site check {site}")


@site_app.command("policy-check")
def policy_check_command(
    policy: Annotated[Path, typer.Argument(help="The site policy YAML (node config key 'policy').")],
) -> None:
    """Validate a site policy file (run it before starting the SuperNode); exit 2 naming each bad key."""
    try:
        parsed = load_policy(policy)
    except PolicyError as err:
        _fail(str(err))
        return
    table = Table(title=f"site policy {policy}")
    table.add_column("key")
    table.add_column("value")
    for key, value in parsed.model_dump().items():
        table.add_row(key, "no limit" if value is None else str(value))
    console.print(table)
    console.print("[green]policy is valid[/]")


def _audit_files(state_dir: Path) -> list[Path]:
    if state_dir.is_file():
        return [state_dir]
    if (state_dir / AUDIT_FILE).is_file():
        return [state_dir / AUDIT_FILE]
    return sorted(state_dir.glob(f"*/{AUDIT_FILE}"))


@site_app.command("audit")
def audit_command(
    state_dir: Annotated[
        Path, typer.Argument(help="The site's state dir (node config 'state-dir', or one site's folder in it).")
    ] = Path("."),
    max_rows: Annotated[int, typer.Option("--max-rows", help="Refusals and errors listed one by one.")] = 50,
) -> None:
    """Summarize a site's audit log: runs, rounds, epsilon per run, refusals and errors."""
    files = _audit_files(state_dir)
    if not files:
        _fail(f"no {AUDIT_FILE} in {state_dir} or its sub-folders (pass the node config's state-dir)")
    entries = []
    for path in files:
        try:
            entries.extend(read_audit(path))
        except ValueError as err:
            _fail(str(err))
    runs, incidents = summarize_audit(entries)
    console.print(render_audit(runs, incidents, max_incidents=max_rows))
    for path in files:
        if (path.parent / LEDGER_FILE).is_file():
            try:
                ledger = PrivacyLedger.open(path.parent)
            except LedgerError as err:
                _fail(str(err))
            console.print(
                f"{path.parent.name}: lifetime epsilon {ledger.spent_epsilon():.4f}, delta {ledger.spent_delta():g} "
                f"over {len(ledger.runs)} run(s) (ledger {path.parent / LEDGER_FILE})"
            )


def register_site_commands(app: typer.Typer) -> None:
    """Mount the hospital's ``site`` group on the ``medfed`` app."""
    app.add_typer(site_app, name="site")
