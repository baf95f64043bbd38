"""``drdd-med convert``: batch-convert DICOM series (folder, DIMSE PACS or DICOMweb) into synthetic CT series."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from drdd_med.pacs.endpoints import SeriesRules, TransferError, open_destination, open_source
from drdd_med.pacs.journal import JournalLockedError, part_journal_path

USER_ENV, PASSWORD_ENV = "DRDD_DICOMWEB_USER", "DRDD_DICOMWEB_PASSWORD"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = f"""\
Convert every selected source series into one synthetic CT series (CT Image Storage, marked
synthetic, referencing its source) at the destination, exactly once: a job journal (SQLite)
records each finished series, so a rerun skips them and a run killed at any point and restarted
finishes the rest without duplicates (the synthetic series' UIDs are derived from the source and
the model). Failed transfers are retried with backoff; a series that still fails, or whose input
is refused (not an image, gantry tilt, missing slices...), or that the destination then holds only
partly (its stored count is checked), is recorded with its reason and the run goes on. A report (CSV and JSON) lists converted / skipped / failed series by keyed hashes of
their UIDs; logs carry no patient data or paths.

SOURCE and DESTINATION are each a folder, a DIMSE node dimse://AET@host:port (C-FIND, then C-GET
or C-MOVE; C-STORE to send), or a DICOMweb root http(s)://host:port/dicom-web (QIDO-RS, WADO-RS;
STOW-RS to send). DICOMweb credentials come from ${USER_ENV} and ${PASSWORD_ENV}.

Uncertainty: --num-samples N draws N samples per series (the synthetic CT is their mean, under a
model version ending in .meanN) and --std-series adds a second derived series per source series,
the per-voxel standard deviation over the N samples in HU, with its own UIDs; the journal marks a
series done only when both are delivered in full.

Engines: by default the series are converted one after the other in this process. With
--engine ray (pip install 'drdd-med[ray]') each series is a Ray task on a cluster (--ray-address,
RAY_ADDRESS, or a Ray started here), with the journal kept by this process; a task whose worker
dies is rerun, still exactly once. Every Ray machine must see the bundle and weights at the same
path, and reach the source and the destination (C-GET, not C-MOVE). --num-parts splits the work
between independent runs instead (job arrays, Kubernetes indexed jobs), each with its own journal.

Exit status: 0 when every selected series was converted or skipped, 1 when some failed (or the
source could not be queried), 2 for a usage or configuration error."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="batch-convert DICOM series from a folder or PACS into synthetic CT series, exactly once",
        description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    parser.add_argument("source", metavar="SOURCE", help="folder, dimse://AET@host:port or DICOMweb URL")
    parser.add_argument("destination", metavar="DESTINATION", help="folder, dimse://AET@host:port or DICOMweb URL")

    select = parser.add_argument_group("series selection (every rule given must hold)")
    select.add_argument("--modality", help="source modality (default: the model's input modality)")
    select.add_argument("--description", metavar="REGEX", help="regular expression searched in SeriesDescription")
    select.add_argument("--study-uid", action="append", default=[], metavar="UID", help="a study to convert (repeat)")
    select.add_argument("--series-uid", action="append", default=[], metavar="UID", help="a series to convert (repeat)")
    select.add_argument("--date-from", metavar="YYYYMMDD", help="earliest StudyDate")
    select.add_argument("--date-to", metavar="YYYYMMDD", help="latest StudyDate")

    model = parser.add_argument_group("model")
    model.add_argument("--bundle", default="drdd_mr2ct", metavar="NAME_OR_PATH",
                       help="bundle folder, or the name of one under bundles/ (default: %(default)s)")
    model.add_argument("--ckpt", type=Path, metavar="FILE", help="weights file (default: the bundle's models/model.pt)")
    model.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    model.add_argument("--batch-size", type=int, metavar="N", help="slices per network call (default: the bundle's)")
    model.add_argument("--num-samples", type=_positive_int, default=1, metavar="N",
                       help="samples per series; the synthetic CT is their per-voxel mean (default: %(default)s)")
    model.add_argument("--std-series", action="store_true",
                       help="also write the per-voxel std over the samples (HU) as a second derived series "
                            "(needs --num-samples of at least 2)")

    network = parser.add_argument_group("network")
    network.add_argument("--calling-aet", default="DRDD", metavar="AET",
                         help="our AE title, registered at the PACS (default: %(default)s)")
    network.add_argument("--retrieve", choices=("get", "move"), default="get", help="DIMSE retrieval by C-GET or C-MOVE")
    network.add_argument("--move-port", type=int, metavar="PORT", help="port of our storage SCP for C-MOVE (registered at the PACS)")
    network.add_argument("--move-host", default="", metavar="HOST", help="interface our C-MOVE storage SCP listens on (default: all)")
    network.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                         help="network timeout (default: %(default)s)")

    run_options = parser.add_argument_group("run")
    run_options.add_argument("--journal", type=Path, default=Path("drdd-convert.sqlite"), metavar="FILE",
                             help="job journal (default: %(default)s); one run at a time per journal")
    run_options.add_argument("--report", type=Path, metavar="PREFIX",
                             help="write PREFIX.csv and PREFIX.json (default: drdd-convert-JOBID beside the journal)")
    run_options.add_argument("--attempts", type=int, default=3, metavar="N",
                             help="tries per transfer before a series fails (default: %(default)s)")
    run_options.add_argument("--backoff", type=float, default=2.0, metavar="SECONDS",
                             help="wait before the second try, doubled for each next one (default: %(default)s)")
    run_options.add_argument("--retry-failed", action="store_true",
                             help="also retry series whose input was refused in an earlier run")
    run_options.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal)")
    run_options.add_argument("--num-parts", type=int, default=1, metavar="N",
                             help="split the series into N parts by a hash of their SeriesInstanceUID, to run "
                                  "on N machines or GPUs at once (default: %(default)s)")
    run_options.add_argument("--part-id", type=int, default=0, metavar="I",
                             help="convert part I (0 .. N-1) only; each part keeps its own journal, "
                                  "FILE.partI-of-N.sqlite beside --journal (default: %(default)s)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: one series after the other here; ray: one Ray task per series (default: %(default)s)")
    engine.add_argument("--ray-address", metavar="ADDRESS",
                        help="Ray cluster to join, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, else a Ray "
                             "started on this machine)")
    engine.add_argument("--ray-cpus", type=float, metavar="N", help="CPUs per Ray task (default: 1)")
    engine.add_argument("--ray-gpus", type=float, metavar="N", help="GPUs per Ray task, e.g. 1 (default: 0)")
    engine.add_argument("--ray-max-retries", type=int, metavar="N",
                        help="reruns of a task whose worker died, before the series fails (default: 3)")
    parser.set_defaults(func=functools.partial(run, parser=parser))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dicomweb_auth() -> tuple[str, str] | None:
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if bool(user) != bool(password):
        raise ValueError(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    return (user, password) if user else None


def _engine(args: argparse.Namespace):
    """The engine the arguments ask for (``None``: the local one); Ray options need ``--engine ray``."""
    options = {"address": args.ray_address, "num_cpus": args.ray_cpus, "num_gpus": args.ray_gpus,
               "max_retries": args.ray_max_retries}
    given = {key: value for key, value in options.items() if value is not None}
    if args.engine == "local":
        if given:
            raise ValueError("the --ray-* options apply to --engine ray only")
        return None
    if args.retrieve == "move":
        raise ValueError("--engine ray needs --retrieve get: a C-MOVE storage SCP listens on this machine only")
    from drdd_med.pacs.ray_engine import RayEngine

    try:
        return RayEngine(**given)
    except ImportError as err:
        raise ValueError(str(err)) from None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from drdd_med.bundle import BundleTranslator
    from drdd_med.pacs.convert import BatchConverter

    if args.std_series and args.num_samples < 2:
        parser.error("--std-series needs --num-samples of at least 2 (a std over one sample does not exist)")
    engine = _engine(args)
    translator = BundleTranslator(args.bundle, device=args.device, ckpt=args.ckpt,
                                  batch_size=args.batch_size, num_samples=args.num_samples)
    rules = SeriesRules(
        modality=args.modality or translator.source_modality,
        description=args.description,
        study_uids=args.study_uid,
        series_uids=args.series_uid,
        date_from=args.date_from,
        date_to=args.date_to,
        num_parts=args.num_parts,
        part_id=args.part_id,
    )
    journal = part_journal_path(args.journal, args.num_parts, args.part_id)
    auth = _dicomweb_auth()
    source = open_source(args.source, calling_aet=args.calling_aet, retrieve=args.retrieve,
                         move_port=args.move_port, move_host=args.move_host, auth=auth, timeout=args.timeout)
    try:
        destination = open_destination(args.destination, calling_aet=args.calling_aet, auth=auth,
                                       timeout=args.timeout)
        converter = BatchConverter(source, destination, translator, journal, rules=rules,
                                   attempts=args.attempts, backoff_s=args.backoff, retry_failed=args.retry_failed,
                                   progress=not args.no_progress, engine=engine, std_series=args.std_series)
        try:
            report = converter.run()
        except JournalLockedError as err:
            print(f"drdd-med convert: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except TransferError as err:  # the source could not be queried: nothing was converted
            print(f"drdd-med convert: error: job {converter.job_id}: {err}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            destination.close()
    finally:
        source.close()
    prefix = args.report or journal.with_name(f"drdd-convert-{report.job_id}")
    csv_path, json_path = report.write(prefix)
    counts = report.counts
    print(f"job {report.job_id}: {counts['converted']} converted, {counts['skipped']} skipped, "
          f"{counts['failed']} failed; report {csv_path.name}, {json_path.name}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK
