"""The quality benchmark: demo students trained under distillation recipes, several seeds each.

Does a student trained from the cache come out better than the same student without it? One run
per arm cannot say (the same demo twice gave the half student's KD-minus-no-KD gap as -0.024 and
+0.022 mAP), so every recipe is trained with several seeds on the demo benchmark (the generated
scenes of ``make demo``, the shipped demo teacher, the students' 4-epoch schedule) and scored
with the project's metric (nuScenes centre-distance mAP on the val split). Writes ``QUALITY.md``,
``quality.json`` and ``quality.png`` at the repository root; never edit them by hand.

Completed runs are reused: each record in ``quality.json`` carries the key it was trained under
(student config text, recipe, seed, targets, teacher checkpoint, data and trainer revision; see
``run_key``), so re-running the script trains only what is missing and the table grows across
sessions. Runs of an older trainer revision move to ``superseded_runs`` and are no longer shown.

Usage::

    python tools/quality.py [--jobs 2] [--seeds 0 1 2] [--max-runs N] [--only half]
    python tools/quality.py --report-only          # rewrite QUALITY.md from quality.json
    python tools/quality.py --quick --out-dir DIR  # tiny smoke run (tests)
    python tools/quality.py --recipes no-kd heatmap=10 --seeds 0 --out-dir DIR --work-dir DIR  # a pilot
    python tools/quality.py --recipes heatmap=10,reg=1,init --only slim --heatmap-codec fp16-zstd1 \
        --out-dir DIR   # a pilot: another heatmap codec (its own cache beside the default one)
    python tools/quality.py --reuse-records DIR/quality.json  # take a pilot's runs that are runs of the plan
    python tools/quality.py --rekey-proof DIR/quality.json  # a trainer change proven to leave results alone

The plan also trains the best recipe's slim student from caches whose heatmaps use other codecs
(``HEATMAP_CODEC_ARMS``, targets ``cache:<codec>``): the report's heatmap codec section.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from trainer.quality import benchmark, keys, report, runs  # noqa: E402


def only_choice(value: str) -> str:
    from trainer.quality.plan import STUDENTS, student_parts

    if value in ("online", "scarce") or value in STUDENTS:
        return value
    try:
        name, labelled = student_parts(value)
    except ValueError:
        name, labelled = "", None
    if name in STUDENTS and labelled:
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give half, slim, coarse, coarse_long, online, scarce or STUDENT@N")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 train / 3 val scenes, one epoch, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side (threads split between them)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--only", type=only_choice, default=None,
                        help="half, slim, coarse, coarse_long, online, scarce (the scarce-label curve), or with "
                             "--recipes a scarce-label student STUDENT@N (its first N train scans labelled)")
    parser.add_argument("--recipes", nargs="+", default=None,
                        help="a pilot: train only these recipes of the half student (--only slim / coarse: of "
                             "that one); give --out-dir elsewhere")
    parser.add_argument("--heatmap-codec", default=None,
                        help="a pilot: cache the teacher's heatmaps in this codec (e.g. fp16-zstd1) instead of "
                             "the build's default; give --out-dir elsewhere")
    parser.add_argument("--reuse-records", nargs="+", default=None, metavar="QUALITY_JSON",
                        help="other quality.json files (a pilot's): a run of this plan that one of their records "
                             "trained under the same key is taken from there, not retrained")
    parser.add_argument("--out-dir", default=str(REPO), help="where QUALITY.md, quality.json, quality.png go")
    parser.add_argument("--work-dir", default=None, help="default: work_dirs/quality (quick: work_dirs/quality_quick)")
    parser.add_argument("--report-only", action="store_true", help="rewrite QUALITY.md from quality.json")
    parser.add_argument("--rekey-proof", default=None, metavar="QUALITY_JSON",
                        help="re-key the records to the current trainer revision, where this quality.json's runs "
                             "(trained at it) reproduce theirs bit for bit; then rewrite the report")
    parser.add_argument("--rekey-baseline", default=None, metavar="QUALITY_JSON",
                        help="with --rekey-proof on another machine than the records': the same runs trained here "
                             "at the records' trainer revision, which the proof must reproduce")
    parser.add_argument("--rekey-retrain", nargs="+", default=(), metavar="KIND",
                        help="with --rekey-proof: kinds of teacher maps whose distillation the trainer change did alter "
                             "(e.g. heatmap): records of recipes distilling them are left to retrain")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.work_dir = args.work_dir or str(REPO / ("work_dirs/quality_quick" if args.quick else "work_dirs/quality"))
    if args.rekey_proof:
        state = runs.load(Path(args.out_dir) / "quality.json")
        benchmark.log(keys.rekey(state, runs.load(Path(args.rekey_proof)), args.quick,
                                 runs.load(Path(args.rekey_baseline)) if args.rekey_baseline else None,
                                 args.rekey_retrain))
        runs.save(Path(args.out_dir) / "quality.json", state)
        report.write_report(Path(args.out_dir), state, state["context"], args.quick)
        return
    if args.report_only:
        state = runs.load(Path(args.out_dir) / "quality.json")
        report.write_report(Path(args.out_dir), state, state["context"], args.quick)
        return
    benchmark.execute(args)


if __name__ == "__main__":
    main()
