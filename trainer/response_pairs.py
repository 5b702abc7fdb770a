"""The response terms' pairs: the student's CenterHead outputs matched to the teacher's (cached or online)
of the same kind by class name (:func:`response_pairs`, :func:`match_by_class`), and what a teacher's head
outputs are (:class:`TeacherOutput`)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

from featcache.errors import ConfigError
from featcache.teacher import models


class TeacherOutput(NamedTuple):
    """A teacher head output a response term can read: its layer, kind (``heatmap``, ``reg``...), task
    classes and what each channel holds (``featcache.teacher.heads.HeadOutput``, or a manifest's ``meaning``)."""

    layer: str
    kind: str
    classes: tuple[str, ...]
    channels: tuple[str, ...]
    head_type: str = ""  # the teacher head's class name (manifest meaning.head_type), for messages


def online_head_outputs(teacher, teacher_cfg, kinds: Sequence[str], where: str) -> list["TeacherOutput"]:
    """An online teacher's head outputs of ``kinds``, described as a cache's manifest describes them. A
    TransFusionHead (BEVFusion) names no classes itself: its heatmap's channels are its config's
    classes (``teacher_class_names``), as ``featcache build`` records them."""
    from featcache.teacher.heads import find_head, head_outputs, is_transfusion_head

    _, head = find_head(teacher)
    classes = teacher_class_names(teacher_cfg, where) if is_transfusion_head(head) else None
    if is_transfusion_head(head) and set(kinds) - {"heatmap"}:
        raise ConfigError(transfusion_reg_advice(f"online teacher {where}", type(head).__name__))
    return [TeacherOutput(output.layer, output.kind, output.classes, output.channels, output.head_type)
            for output in head_outputs(teacher, list(dict.fromkeys(kinds)), classes)]


def teacher_class_names(teacher_cfg, where: str) -> list[str]:
    """The class of each of a teacher's prediction labels: its config's ``class_names``, else its train
    dataset's ``metainfo.classes`` (what ``featcache build --boxes`` records)."""
    classes = teacher_cfg.get("class_names")
    if not classes:
        classes = (models.unwrap_dataset_cfg(teacher_cfg.train_dataloader.dataset).get("metainfo") or {}).get("classes")
    if not classes:
        raise ConfigError(f"teacher config {where} names no class_names (nor train dataset metainfo.classes): its "
                          "boxes' labels could not be matched to the student's classes")
    return list(classes)


def transfusion_reg_advice(where: str, head_type: str = "TransFusionHead") -> str:
    """What to do instead of --kd reg when the teacher's head regresses boxes per object query."""
    return (f"--kd reg distils a CenterHead's dense regression outputs (reg, height, dim, rot, vel), and the head of "
            f"{where} is a {head_type} (BEVFusion), which regresses boxes per object query and has none: "
            "`featcache build --head-outputs all` refuses it. What distils a TransFusionHead teacher's responses: "
            "--kd heatmap (its class heatmap, from a cache built with --head-outputs heatmap) and --kd label (its "
            "decoded boxes, from a cache built with --boxes), e.g. --kd heatmap=10,label=1 on a cache built with "
            "--head-outputs heatmap --boxes")


def match_by_class(student: Sequence[tuple[str, Sequence[str]]], teacher: Sequence[tuple[str, Sequence[str]]],
                   where: str) -> dict[str, tuple[str, list[int]]]:
    """Pair each student head output (with its task's classes) with the teacher output of the same kind
    that holds the same classes, matched by name, not position: a 10-class one-task teacher distils a
    6-class student of four tasks. Returns student layer -> (teacher layer, per student channel the
    teacher channel, -1 for a class the teacher lacks); a student task whose classes the teacher has
    in none of its layers is left out, one whose classes are split over several is an error."""
    pairs: dict[str, tuple[str, list[int]]] = {}
    for s_layer, classes in student:
        found = {t_layer: [list(t_classes).index(name) if name in t_classes else -1 for name in classes]
                 for t_layer, t_classes in teacher if set(classes) & set(t_classes)}
        if len(found) > 1:
            raise ConfigError(f"a response term compares one student head output with one teacher output, but the classes "
                              f"{list(classes)} of student layer {s_layer} are split over teacher layers {sorted(found)} "
                              f"({where}); give the student tasks that group classes as the teacher's do")
        if found:
            (t_layer, channels), = found.items()
            pairs[s_layer] = (t_layer, channels)
    if not pairs:
        raise ConfigError(f"the response terms found no student class among the teacher's head classes ({where}: "
                          f"{sorted({name for _, names in teacher for name in names})}; student: "
                          f"{sorted({name for _, names in student for name in names})})")
    return pairs


def config_head_type(config_text: str | None) -> str:
    """"TransFusionHead" when a cache's recorded teacher config (its text) names one, else "" (for messages:
    a cache without head outputs records no head type)."""
    import re

    return "TransFusionHead" if re.search(r"type\s*=\s*['\"]TransFusionHead['\"]", config_text or "") else ""


def response_pairs(student, config: str, kinds: Sequence[str], teacher: Sequence[TeacherOutput], where: str,
                   teacher_head_type: str = "") -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, dict]]]:
    """The head-output pairs of the response terms, which read the head outputs of ``kinds`` (their
    ``KDTerm.kinds``): heatmaps (student layer -> (teacher layer, channel map)), regression outputs
    (student layer -> (teacher layer, dict(kind, labels, log_dims))), student tasks matched to teacher
    tasks by class name (``match_by_class``)."""
    from featcache.teacher.heads import head_outputs, find_head
    from trainer.response import REGRESSION_KINDS

    available = {out.kind for out in teacher}
    transfusion = [name for name in (*(out.head_type for out in teacher), teacher_head_type) if name == "TransFusionHead"]
    if transfusion and set(REGRESSION_KINDS) & set(kinds) and not available & set(REGRESSION_KINDS):
        raise ConfigError(transfusion_reg_advice(where, transfusion[0]))
    for wanted, what, option in ((["heatmap"], "class heatmaps", "--head-outputs heatmap"),
                                 (list(REGRESSION_KINDS), "regression outputs",
                                  "--head-outputs all (or reg,height,dim,rot,vel)")):
        if set(wanted) & set(kinds) and not available & set(wanted):
            raise ConfigError(f"--kd {'heatmap' if wanted == ['heatmap'] else 'reg'} distils the teacher's {what}, "
                              f"and {where} has none; build it with `featcache build ... {option}` (features "
                              "and head outputs in one pass)")
    kinds = [kind for kind in dict.fromkeys(kinds) if kind in available]  # a KITTI head has no vel
    try:
        outputs = head_outputs(student, kinds)
        _, head = find_head(student)
    except ConfigError as exc:
        raise ConfigError(f"the response terms distil CenterHead outputs; student {config}: {exc}") from exc
    flat_classes = [name for classes in head.class_names for name in classes]  # CenterHead's label order
    log_dims = bool(getattr(head, "norm_bbox", True))
    heatmaps, regressions = {}, {}
    for kind in kinds:
        matched = match_by_class([(out.layer, out.classes) for out in outputs if out.kind == kind],
                                 [(out.layer, out.classes) for out in teacher if out.kind == kind], where)
        for s_layer, (t_layer, channels) in matched.items():
            if kind == "heatmap":
                heatmaps[s_layer] = (t_layer, channels)
                continue
            if kind == "dim":
                teacher_log = next(out for out in teacher if out.layer == t_layer).channels[:1] == ("log_l",)
                if teacher_log != log_dims:
                    raise ConfigError(f"the reg term: teacher output {t_layer} holds {'log ' if teacher_log else ''}box "
                                      f"extents, student {config} predicts {'log ' if log_dims else ''}extents "
                                      "(CenterHead norm_bbox): distil heads with the same norm_bbox")
            classes = next(out.classes for out in outputs if out.layer == s_layer)
            labels = [flat_classes.index(name) for name, channel in zip(classes, channels) if channel >= 0]
            regressions[s_layer] = (t_layer, dict(kind=kind, labels=labels, log_dims=log_dims))
    return heatmaps, regressions
