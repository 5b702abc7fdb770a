"""QUALITY.md and quality.png from quality.json's records: the table per recipe, what the runs say, the
targets of issue #15 and the heatmap codec section. ``render_report`` is a pure function of the records, the
context and the writing machine's description, so the committed report can be regenerated and compared."""
from __future__ import annotations

import itertools
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.quality.keys import CODE_FIELDS, TRAINER_FILES
from trainer.quality.plan import (COARSE_PILOT_SEED, COARSE_RECIPE, COARSE_SEEDS, CORE_RECIPES, INIT,
                                  LABELLED_SEPARATOR, NO_KD, SCARCE_COUNT, SCARCE_COUNTS, SCARCE_CURVE_SEED, SCARCE_LONG_COUNTS,
                                  SCARCE_LONG_STUDENT, SCARCE_RECIPES, SCARCE_SEEDS, SCARCE_STUDENT, best_recipe,
                                  group_records,
                                  heatmap_codec_arms, heatmap_codec_of, missing_runs, targets_of, with_crd)
from trainer.quality.runs import now


def describe(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def compare(values: list[float], base: list[float]) -> tuple[float, float | None]:
    """(mean of ``values`` - mean of ``base``, that difference / the larger of the two stds); the gap is
    None when that std is not a positive number (one seed, or identical seeds)."""
    (mean, std), (base_mean, base_std) = describe(values), describe(base)
    larger = max(std, base_std)
    return mean - base_mean, (mean - base_mean) / larger if larger == larger and larger > 0 else None  # NaN-safe


@dataclass(frozen=True)
class PairedDifference:
    """A recipe minus its no-KD twin, seed by seed (the same seed: the same initialisation and data order), and
    the 95% Student-t interval of the mean difference over those seeds."""

    mean: float
    low: float
    high: float
    seeds: int

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({self.seeds})"


def differences_by_seed(records: list[dict], base: list[dict]) -> dict[int, float]:
    """``records``' mAP minus ``base``'s at each seed both trained (same seed: same initialisation and data
    order), by seed in order."""
    base_by_seed = {record["seed"]: record["mAP"] for record in base}
    return {record["seed"]: record["mAP"] - base_by_seed[record["seed"]]
            for record in sorted(records, key=lambda r: r["seed"]) if record["seed"] in base_by_seed}


def paired_difference(records: list[dict], base: list[dict]) -> PairedDifference | None:
    """The mean of :func:`differences_by_seed` and its interval; None under two such seeds (no interval)."""
    from scipy.stats import t

    differences = list(differences_by_seed(records, base).values())
    if len(differences) < 2:
        return None
    mean = statistics.mean(differences)
    half_width = float(t.ppf(0.975, len(differences) - 1)) * statistics.stdev(differences) / len(differences) ** 0.5
    return PairedDifference(mean, mean - half_width, mean + half_width, len(differences))


@dataclass(frozen=True)
class Writer:
    """Where and when a report was written (its header says so; the runs' own machine may differ)."""

    written: str  # "2026-12-07 17:56 UTC"
    machine: str  # "2 cores, x86_64, Linux 6.18.44"
    versions: str  # "featcache 0.1.0, torch 2.13.0+cpu, ..."


def this_machine() -> Writer:
    """This machine, now: the writer of a report written here."""
    from featcache.format import library_versions

    versions = {**library_versions(), "python": platform.python_version()}
    return Writer(written=now(),
                  machine=f"{len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}, "
                          f"Linux {platform.release()}",
                  versions=", ".join(f"{name} {version}" for name, version in versions.items()))


def write_report(out_dir: Path, state: dict[str, Any], context: dict[str, Any], quick: bool) -> None:
    """QUALITY.md and quality.png in ``out_dir``, written by this machine now."""
    plot(out_dir / "quality.png", group_records(state["runs"]), state["teacher"]["mAP"])
    (out_dir / "QUALITY.md").write_text(render_report(state, context, quick, this_machine()))


def render_report(state: dict[str, Any], context: dict[str, Any], quick: bool, writer: Writer) -> str:
    """QUALITY.md's text for the records of ``state`` (quality.json) under ``context``, written by ``writer``."""
    teacher = state["teacher"]
    groups = group_records(state["runs"])
    records_by_group: dict[tuple[str, str, str], list[dict]] = {}
    for record in state["runs"]:
        records_by_group.setdefault((record["student"], record["recipe"], record["targets"]), []).append(record)
    lines = ["# featcache quality benchmark", "",
             f"Generated by `python tools/quality.py{' --quick' if quick else ''}` (last written {writer.written}) from the "
             f"runs in `quality.json`; every figure is measured by the runs listed there. Do not edit by hand.", "",
             f"- machine: {writer.machine} (the machine that wrote this report; the runs' own may differ, see the "
             "re-keying lines); two trainings side by side at one torch thread each",
             f"- versions: {writer.versions}",
             *(f"- re-keyed from trainer revision {entry['from']} to {entry['to']} ({entry['at']}, {entry['records']} "
               f"records, none retrained): these runs trained again at both revisions on the re-keying machine gave "
               f"the same mAP bit for bit: {'; '.join(entry['proof'])}"
               + (f"; the {entry['left_to_retrain']} records distilling {', '.join(entry['retrain_kinds'])} were not "
                  "re-keyed (the change altered those terms) and are retrained" if entry.get("left_to_retrain") else "")
               for entry in state.get("rekeyed", [])),
             *([f"- key v3 adopted {state['key_v3']['at']} by {state['key_v3']['records']} records of trainer revision "
                f"{state['key_v3']['trainer_revision']} keyed v2 (which held neither the code identity below nor "
                "repository-relative configs); the identity they hold is the code's at adoption, their runs' own "
                "featcache code is not recorded"]
               if state.get("key_v3") else []),
             *([f"- code identity in every run key: featcache {context['featcache_revision']}, scene generator "
                f"{context['generator_revision']}, teacher config {context['teacher_config_sha256']}; libraries: "
                f"{context['libraries']}"] if all(field in context for field in CODE_FIELDS) else []),
             f"- trainer revision {context['trainer_revision']} (sha256 of trainer/{{{','.join(TRAINER_FILES)}}}); "
             f"teacher checkpoint sha256 {context['teacher_sha256'][:12]}; scenes stamp {context['data_stamp']}",
             f"- benchmark: the demo's generated scenes ({'6 train / 3 val' if quick else '400 train / 100 val'} "
             "ray-cast scans), the shipped demo teacher "
             "(`configs/demo/teacher_pillar.py`), its `pts_neck` map, every CenterHead output and its decoded boxes "
             "(`--boxes`: label KD, reg's teacher peaks) cached once "
             f"(codecs: {context.get('cache_codecs', 'not recorded')}), students trained "
             f"{1 if quick else 4} epoch(s) (the demo schedule; the coarse student's rate anneals per iteration to "
             "1e-3 of its peak, `configs/demo/student_coarse.py`) with `featcache train --kd RECIPE --cfg-options "
             "randomness.seed=SEED`; "
             "mAP = nuScenes centre-distance AP over 0.5/1/2/4 m on the val split (`trainer/evaluation.py`)"
             + (" — QUICK smoke-test sizes, not representative" if quick else ""), "",
             f"Teacher: mAP **{teacher['mAP']:.4f}**, {teacher['params']:,} parameters.", ""]
    header = ["student", "recipe", "targets", "seeds", "mAP mean ± std", "min..max", "retention", "gain over no-KD",
              "gap / larger std", "paired difference [95% interval] (seeds)", "params", "step s", "train s"]
    rows = []
    verdicts = []
    for (student, recipe, targets), values in sorted(groups.items(), key=lambda item: (item[0][0], item[0][2],
                                                                                        item[0][1] != NO_KD, item[0][1])):
        mean, std = describe(values)
        base = groups.get((student, NO_KD, "none"))
        gain = gap = paired = None
        if base and recipe != NO_KD:
            gain, gap = compare(values, base)
            paired = paired_difference(crediting(records_by_group[(student, recipe, targets)], student, recipe),
                                       records_by_group[(student, NO_KD, "none")])
            # a codec arm is judged against the default cache's runs (its section), not drawn as a recipe
            if gap is not None and len(values) >= 3 and len(base) >= 3 and not heatmap_codec_of(targets):
                verdicts.append((student, recipe, targets, gain, gap, paired))
        records = records_by_group[(student, recipe, targets)]
        step = [r["step_s"] for r in records if r.get("step_s")]
        rows.append([student, f"`{recipe}`", targets, str(len(values)),
                     f"{mean:.4f} ± {std:.4f}" if std == std else f"{mean:.4f}",
                     f"{min(values):.4f}..{max(values):.4f}", f"{mean / teacher['mAP']:.3f}",
                     "" if gain is None else f"{gain:+.4f}", "" if gap is None else f"{gap:+.2f}",
                     "" if paired is None else str(paired), f"{records[0]['params']:,}", f"{statistics.median(step):.3f}" if step else "",
                     f"{statistics.median(r['train_s'] for r in records):.0f}"])
    lines += ["## mAP per recipe", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Gap = (recipe mean - no-KD mean) / the larger of the two standard deviations. Paired difference: "
              "the recipe's mAP minus its no-KD twin's at each seed both trained (same seed: same initialisation and "
              "data order), their mean and its 95% Student-t interval; an interval above 0 says the recipe helps "
              "beyond the seed-to-seed spread of that difference (the coarse student's chosen recipe: on the fresh "
              f"seeds only, not the seed-{COARSE_PILOT_SEED} pilot that chose it). Step s: median "
              "logged iteration time at one torch thread with another training beside it, and possibly other jobs "
              "(tests) on the machine: a record of the run, not a speed figure (BENCHMARKS.md figure 7 times the "
              "terms side by side).", "",
              "![mAP per recipe, one dot per seed](quality.png)", "", "## What the runs say", ""]
    best = best_recipe(state["runs"], "half")
    lines += conclusions(groups, verdicts, best, records_by_group)
    lines += ["", "## Targets (issue #30: distillation that teaches)", ""]
    lines += teaching_targets(records_by_group, teacher["mAP"], best)
    lines += ["", "## Scarce labels (issue #31)", ""] + scarce_section(records_by_group)
    lines += ["", "## Targets (issue #15)", ""] + target_table(groups, teacher["mAP"], best)
    lines += heatmap_codec_section(records_by_group, best, state.get("heatmap_caches", {}), context)
    missing = missing_runs(state, quick)
    if missing:
        lines += ["", "## Not run yet", "", "These runs of the plan have no result yet (`python tools/quality.py` "
                  "trains them, reusing every run above): " + ", ".join(f"`{name}`" for name in missing) + "."
                  + ("" if best else " Once the core recipes have every seed, the best "
                     "of them also gets its slim-student, online-teacher and `+crd=1` runs.")]
    if state.get("superseded_runs"):
        lines += ["", f"{len(state['superseded_runs'])} earlier runs were trained under another trainer revision, "
                  "teacher, data or config; they are kept in `quality.json` (`superseded_runs`) and not shown."]
    return "\n".join(lines) + "\n"


def crediting(records: list[dict], student: str, recipe: str) -> list[dict]:
    """The records that may credit a recipe: all, but for the coarse student's chosen recipe the pilot seed that
    chose it (its paired difference is taken on the fresh ``COARSE_SEEDS``)."""
    if (student, recipe) != ("coarse", COARSE_RECIPE):
        return records
    return [record for record in records if record["seed"] != COARSE_PILOT_SEED]


def _paired_note(paired: PairedDifference | None) -> str:
    return "" if paired is None else f"; paired by seed: {paired}"


def conclusions(groups, verdicts, best: str | None, records_by_group: dict[tuple[str, str, str], list[dict]]
                ) -> list[str]:
    lines = []
    clear = [v for v in verdicts if v[3] > 0 and v[4] > 3]
    for student, recipe, targets, gain, gap, paired in sorted(verdicts, key=lambda v: -v[3]):
        judgement = ("beats no-KD beyond the spread" if gap > 3 else
                     "is above no-KD, within the spread" if gain > 0 else "is not better than no-KD")
        source = {"cache": "from the cache", "online": "from the teacher run online", "none": "(no teacher targets)"}
        lines.append(f"- {student} student, `{recipe}` {source.get(targets, targets)}: {judgement} "
                     f"({gain:+.4f} mAP, {gap:+.2f} x the larger std{_paired_note(paired)}).")
    if not verdicts:
        lines.append("- No recipe has 3 seeds beside 3 no-KD seeds yet; no comparison is drawn.")
    elif not clear:
        lines.append("- **No recipe beats its no-KD twin beyond the run-to-run spread** (gap > 3 x the larger std): "
                     "on this benchmark, distillation from the cache does not measurably help yet.")
    crd = [v for v in verdicts if v[1] == "crd=1" and v[0] == "half"]
    if crd:
        _, _, _, gain, gap, _ = crd[0]
        top = max((v for v in verdicts if v[0] == "half"), key=lambda v: v[3])
        lines.append(f"- CRD alone (`crd=1`) changes the half student's mAP by {gain:+.4f} ({gap:+.2f} x the "
                     f"larger std) against no-KD; the best half recipe here is `{top[1]}` ({top[3]:+.4f}).")

    def on_top(what: str, recipe: str, targets: str, under: str, versus: str) -> None:
        """A line on what ``recipe`` changes against ``under`` (both with 3 seeds) for the half student."""
        values, base = groups.get(("half", recipe, targets)), groups.get(("half", under, targets_of(under)))
        if values and base and len(values) >= 3 and len(base) >= 3:
            change, gap = compare(values, base)
            paired = paired_difference(records_by_group[("half", recipe, targets)],
                                       records_by_group[("half", under, targets_of(under))])
            lines.append(f"- {what}: `{recipe}`{versus} changes the half student's mAP by {change:+.4f} "
                         f"({float('nan') if gap is None else gap:+.2f} x the larger std{_paired_note(paired)}).")

    if best is not None and best != INIT and INIT in best.split(","):  # what the cache adds to the weights alone
        on_top("The cached targets on top of the teacher's weights", best, targets_of(best), INIT,
               f" against `{INIT}` alone")
    # what a core recipe's one added term changes against the core recipe (of several parts) without it
    for recipe, under in itertools.permutations(CORE_RECIPES, 2):
        parts, under_parts = set(recipe.split(",")), set(under.split(","))
        added = parts - under_parts
        if len(under_parts) > 1 and under_parts < parts and len(added) == 1 and INIT not in added:
            on_top(f"`{added.pop()}` on top of `{under}`", recipe, targets_of(recipe), under, f" against `{under}`")
    if best is not None:  # what CRD adds on top of the best core recipe
        on_top(f"CRD on top of the best core recipe (`{best}`)", with_crd(best), "cache", best, "")
    return lines


def heatmap_codec_section(records_by_group: dict[tuple[str, str, str], list[dict]], best: str | None,
                          bytes_per_value: dict[str, float], context: dict[str, Any]) -> list[str]:
    """What heatmaps need: the best recipe's slim student from the default cache and from each codec arm's,
    seed by seed (paired: same seed, same everything but the heatmap targets)."""
    from featcache import head_layers

    arms = heatmap_codec_arms(best) if best else ()
    default = records_by_group.get(("slim", best, "cache"), [])
    if not arms or not default:
        return []
    default_codec = context.get("heatmap_codec", head_layers.HEATMAP_CODEC.name)
    header = ["heatmaps", "bytes / value", "seeds", "mAP mean ± std", "minus default, seed by seed", "mean difference"]
    rows = []
    for codec, targets in [(default_codec, "cache")] + [(codec, f"cache:{codec}") for codec in arms]:
        arm = records_by_group.get(("slim", best, targets), [])
        by_seed = {r["seed"]: r["mAP"] for r in arm}
        if not by_seed:
            rows.append([f"`{codec}`", "", "0", "not run yet", "", ""])
            continue
        mean, std = describe(list(by_seed.values()))
        paired = differences_by_seed(arm, default)
        size = bytes_per_value.get(codec)
        rows.append([f"`{codec}`" + (" (default)" if targets == "cache" else ""),
                     "" if size is None else f"{size:.2f}", str(len(by_seed)),
                     f"{mean:.4f} ± {std:.4f}" if std == std else f"{mean:.4f}",
                     "" if targets == "cache" else " / ".join(f"{difference:+.4f}" for difference in paired.values()),
                     "" if targets == "cache" or not paired else f"{statistics.mean(paired.values()):+.4f}"])
    return ["", "## Heatmap codec", "",
            f"What heatmaps need: the slim student's best recipe (`{best}`) trained from caches that differ only in "
            "how the teacher's class heatmaps are stored (each arm its own cache of the same teacher and scenes), "
            "same seeds. With the teacher's weights the seeds' trajectories stay close, so the same seed's "
            "difference measures the codec; from scratch they diverge by about +-0.02. Bytes / value: the "
            "heatmap chunks' stored bytes over their values, on the demo teacher (a trained head's maps are "
            "mostly background).", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def teaching_targets(records_by_group: dict[tuple[str, str, str], list[dict]], teacher_map: float,
                     best: str | None) -> list[str]:
    """Issue #30's targets, each from the runs above: the student that cannot inherit against its no-KD twin
    (paired by seed, ``COARSE_SEEDS``), the half and slim students' retention, the cached targets beyond ``init``."""
    def result(ok: bool | None) -> str:
        return "not run yet" if ok is None else "PASS" if ok else "MISS"

    def runs(student: str, recipe: str | None) -> list[dict]:
        return records_by_group.get((student, recipe, targets_of(recipe)), []) if recipe else []

    rows = []
    fresh = [runs("coarse", recipe) for recipe in (COARSE_RECIPE, NO_KD)]
    paired = paired_difference(*([record for record in group if record["seed"] in COARSE_SEEDS] for group in fresh))
    enough = paired is not None and paired.seeds >= len(COARSE_SEEDS)
    rows.append([f"coarse (cannot inherit), `{COARSE_RECIPE}` (chosen on the seed-{COARSE_PILOT_SEED} pilot) minus its "
                 "no-KD twin, paired by seed on fresh seeds",
                 f">= +0.05 mAP, 95% interval above 0, seeds {', '.join(map(str, COARSE_SEEDS))}",
                 "" if paired is None else str(paired),
                 result(None if not enough else paired.mean >= 0.05 and paired.low > 0)])
    for student, goal in (("half", 0.98), ("slim", 0.90)):
        values = [record["mAP"] for record in runs(student, best)]
        retention = statistics.mean(values) / teacher_map if len(values) >= 3 else None
        rows.append([f"{student}, best core recipe{f' `{best}`' if best else ''}: retention (mean mAP / teacher mAP)",
                     f">= {goal:.2f}", "" if retention is None else f"{retention:.3f} ({len(values)} seeds)",
                     result(None if retention is None else retention >= goal)])
    beyond = (paired_difference(runs("half", best), runs("half", INIT))
              if best and best != INIT and INIT in best.split(",") else None)
    rows.append(["half, the cached targets beyond the teacher's weights (best core recipe minus `init`, paired)",
                 "stated; aiming for a 95% interval above 0 over 5 seeds", "" if beyond is None else str(beyond),
                 "not run yet" if beyond is None else "above 0" if beyond.low > 0 else "interval spans 0"
                 if beyond.high > 0 else "below 0"])
    lines = ["| target | goal | measured | result |", "|---|---|---|---|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def scarce_section(records_by_group: dict[tuple[str, str, str], list[dict]]) -> list[str]:
    """Issue #31's first step: the no-KD curve of the student that cannot inherit over labelled-scan counts (the
    same iterations each; ``SCARCE_COUNTS``, and ``SCARCE_LONG_COUNTS`` on the long schedule), against the same
    student with all 400 labelled, and where it is data-limited (>= 0.05 below): the setting its unlabelled scans
    are measured in."""
    rows, limited = [], []
    for student, counts in ((SCARCE_STUDENT, SCARCE_COUNTS), (SCARCE_LONG_STUDENT, SCARCE_LONG_COUNTS)):
        full = [record["mAP"] for record in records_by_group.get((student, NO_KD, "none"), [])]
        for count in counts:
            values = [record["mAP"] for record in
                      records_by_group.get((f"{student}{LABELLED_SEPARATOR}{count}", NO_KD, "none"), [])]
            below = statistics.mean(full) - statistics.mean(values) if values and full else None
            if below is not None and below >= 0.05:
                limited.append(f"`{student}@{count}`")
            rows.append([f"`{student}`", str(count), "" if not values else f"{statistics.mean(values):.4f} "
                         f"({len(values)} seed{'s' if len(values) > 1 else ''})", "" if below is None else f"{-below:+.4f}",
                         "not run yet" if below is None else "yes" if below >= 0.05 else "no"])
        rows.append([f"`{student}`", "400 (all)", f"{statistics.mean(full):.4f} ({len(full)} seed{'s' if len(full) > 1 else ''})"
                     if full else "not run yet", "", ""])
    lines = ["The student that cannot inherit, without KD, its first N train scans labelled, trained the iterations of "
             "the full split (more epochs, the same per-iteration schedule; `coarse`: 800 iterations, `coarse_long`: "
             "1,600):", "",
             "| student | labelled scans | no-KD mAP | minus all 400 | data-limited (>= 0.05 below) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", ("Data-limited: " + ", ".join(limited) + ". The setting measured: "
                   f"`{SCARCE_STUDENT}@{SCARCE_COUNT}`, its other train scans as teacher-only samples." if limited
                   else "No setting is data-limited yet.")]
    scarce = f"{SCARCE_STUDENT}{LABELLED_SEPARATOR}{SCARCE_COUNT}"

    def fresh(recipe: str) -> list[dict]:
        return [record for record in records_by_group.get((scarce, recipe, targets_of(recipe)), [])
                if record["seed"] in SCARCE_SEEDS]

    soft, alone, hard = (fresh(recipe) for recipe in SCARCE_RECIPES)
    with_scans = paired_difference(soft, alone)
    against_hard = paired_difference(soft, hard)
    enough = with_scans is not None and with_scans.seeds >= len(SCARCE_SEEDS)
    lines += ["", "Targets (issue #31), paired by seed on the fresh seeds "
              f"{', '.join(map(str, SCARCE_SEEDS))} (seed {SCARCE_CURVE_SEED} is the pilot):", "",
              "| target | goal | measured | result |", "|---|---|---|---|",
              f"| `{scarce}`: `{SCARCE_RECIPES[1]}` minus `{SCARCE_RECIPES[0]}` (the unlabelled scans' worth) | >= +0.03 "
              f"mAP, 95% interval above 0 | {'' if with_scans is None else with_scans} | "
              f"{'not run yet' if not enough else 'PASS' if with_scans.mean >= 0.03 and with_scans.low > 0 else 'MISS'} |",
              f"| `{scarce}`: soft cached targets minus hard pseudo-labels on the same scans (`{SCARCE_RECIPES[1]}` minus "
              f"`{SCARCE_RECIPES[2]}`) | stated | {'' if against_hard is None else against_hard} | "
              f"{'not run yet' if against_hard is None else 'stated'} |"]
    return lines


def target_table(groups, teacher_map: float, best: str | None) -> list[str]:
    """Issue #15's quality targets, each measured from the runs above (or "not run yet")."""
    def result(ok: bool | None) -> str:
        return "not run yet" if ok is None else "PASS" if ok else "MISS"

    rows = []
    half_base = groups.get(("half", NO_KD, "none"))
    best_runs = groups.get(("half", best, targets_of(best))) if best else None
    label = f"best core recipe `{best}`" if best else "best core recipe (after every core recipe's seeds)"
    gain = gap = retention = None
    if best_runs and half_base and len(best_runs) >= 3 and len(half_base) >= 3:
        gain, gap = compare(best_runs, half_base)
        gap, retention = float("inf") if gap is None else gap, statistics.mean(best_runs) / teacher_map
    rows.append([f"half, {label}: mean mAP - no-KD mean", ">= +0.05", "" if gain is None else f"{gain:+.4f}",
                 result(None if gain is None else gain >= 0.05)])
    rows.append([f"half, {label}: gap / larger std", "> 3", "" if gap is None else f"{gap:.1f}",
                 result(None if gap is None else gap > 3)])
    rows.append([f"half, {label}: retention (mean mAP / teacher mAP)", ">= 0.90",
                 "" if retention is None else f"{retention:.3f}", result(None if retention is None else retention >= 0.90)])
    slim = groups.get(("slim", best, targets_of(best))) if best else None
    ok = None
    if slim and half_base and len(slim) >= 3:
        ok = statistics.mean(slim) >= statistics.mean(half_base)
    named = f"`{best}`" if best else "the best core recipe"
    rows.append([f"slim, {named}: mean mAP >= half no-KD mean", f"{statistics.mean(half_base):.4f}" if half_base else "",
                 f"{statistics.mean(slim):.4f}" if slim else "", result(ok)])
    online = groups.get(("half", best, "online")) if best else None
    ok = measured = None
    if online and best_runs and half_base and len(half_base) >= 2:
        spread = max(half_base) - min(half_base)
        measured = online[0] - best_runs[0]  # same seed (0): online minus cached
        ok = abs(measured) <= spread
    rows.append([f"half, {named}, seed 0: online minus cached mAP", "within the no-KD spread (max - min)"
                 + (f" {max(half_base) - min(half_base):.4f}" if half_base and len(half_base) >= 2 else ""),
                 "" if measured is None else f"{measured:+.4f}", result(ok)])
    lines = ["| target | goal | measured | result |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Step time per recipe against no-KD is BENCHMARKS.md's figure 7 (the terms timed side by side), not "
              "this table's step s column."]
    return lines


def plot(path: Path, groups, teacher_map: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s}\n{r}\n({t})" for (s, r, t) in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4.5))
    for index, values in enumerate(groups.values()):
        ax.scatter([index] * len(values), values, s=28, zorder=3)
        ax.hlines(statistics.mean(values), index - 0.25, index + 0.25, colors="k", zorder=4)
    ax.axhline(teacher_map, color="tab:red", linestyle="--", label=f"teacher {teacher_map:.3f}")
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel("val mAP")
    ax.set_title("mAP per recipe (dots: seeds, bar: mean)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
