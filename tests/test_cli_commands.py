"""The command lines README.md shows parse with the real CLI (parse only: no command runs), so the
README cannot drift from the CLI; ``--cfg-options`` takes mmengine's DictAction syntax."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from featcache.teacher.options import parse_cfg_options
from trainer.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
KEY_VALUE = re.compile(r"^[A-Za-z_][^=\s]*=")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _synopsis_to_args(tokens: list[str]) -> list[str]:
    """A README synopsis as one concrete command: ``[...]`` optional parts kept, the first of ``a | b``
    alternatives taken, ``...`` dropped."""
    args, skip_next = [], False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token == "|":
            skip_next = True
            continue
        token = token.strip("[]")
        if token and token != "..." and not token.endswith(",..."):
            args.append(token)
    return args


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(line, featcache arguments)`` of every featcache / launcher command in README's bash blocks."""
    commands = []
    for block in _bash_blocks(README.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if not tokens:
                continue
            if tokens[0] == "featcache":
                args = tokens[1:]
            elif tokens[0] in ("torchrun", "python") and "featcache.cli" in tokens:
                args = tokens[tokens.index("featcache.cli") + 1:]
            elif tokens[0] == "tools/dist_build.sh":  # CONFIG CHECKPOINT GPUS [build options]
                args = ["build", tokens[1], tokens[2], *tokens[4:]]
            elif tokens[0] == "tools/dist_train.sh":  # CONFIG GPUS [train options]
                args = ["train", tokens[1], *tokens[3:]]
            else:
                continue
            args = _synopsis_to_args(args)
            if args[1:]:  # `torchrun ... build ...` stands for the line above
                commands.append((line.strip(), args))
    return commands


def parse(args: list[str]) -> dict:
    """The parameters click gives the command ``args`` names, without running it."""
    with main.make_context("featcache", list(args), resilient_parsing=False) as ctx:
        tokens = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # click 8.2+ keeps the command name apart
        name, command, rest = main.resolve_command(ctx, tokens)
        with command.make_context(name, rest, parent=ctx) as sub:
            return dict(sub.params)


COMMANDS = readme_commands()


def test_readme_has_the_commands_it_documents():
    names = {args[0] for _, args in COMMANDS}
    assert {"build", "verify", "inspect", "export", "train"} <= names, names
    assert sum(1 for line, _ in COMMANDS if line.startswith("tools/dist_")) >= 3


@pytest.mark.parametrize("line, args", COMMANDS, ids=[" ".join(args[:2]) for _, args in COMMANDS])
def test_readme_command_parses(line, args):
    try:
        params = parse(args)
    except click.ClickException as exc:
        pytest.fail(f"README line {line!r} does not parse: {exc.format_message()}")
    items = list(params.get("cfg_options", ()))
    parse_cfg_options(items)  # every item is key=value with an mmengine value
    for position, token in enumerate(args):  # every KEY=VALUE written after --cfg-options reached it
        if token == "--cfg-options":
            following = args[position + 1:]
            written = following[:next((i for i, t in enumerate(following) if not KEY_VALUE.match(t)), len(following))]
            assert written and all(item in items for item in written), (line, written, items)


def test_cfg_options_take_several_items_per_flag_and_repeated_flags():
    params = parse(["build", "cfg.py", "ckpt.pth", "--out", "o", "--cfg-options", "a=1", "b=[1,2]", "--force",
                    "--cfg-options", "c=(1,2)", "d=x,y", "--cfg-options=e=None", "f.g='s'", "--split", "val"])
    assert params["cfg_options"] == ("a=1", "b=[1,2]", "c=(1,2)", "d=x,y", "e=None", "f.g='s'")
    assert params["force"] and params["split"] == "val" and params["checkpoint"] == "ckpt.pth"
    assert parse_cfg_options(params["cfg_options"]) == {"a": 1, "b": [1, 2], "c": (1, 2), "d": ["x", "y"],
                                                       "e": None, "f.g": "s"}
    # a positional argument without '=' ends the items; a later item for a key wins (DictAction)
    params = parse(["train", "--cfg-options", "a.b=1", "a.b=2", "student.py", "--cache", "C",
                    "--teacher-cfg-options", "x=1", "y=2"])
    assert params["student_config"] == "student.py" and params["cache"] == "C"
    assert parse_cfg_options(params["cfg_options"]) == {"a.b": 2}
    assert params["teacher_cfg_options"] == ("x=1", "y=2")
    for command in (["verify", "C", "--repair"], ["inspect", "C", "--fidelity", "1"]):
        assert parse([*command, "--cfg-options", "a=1", "b=2"])["cfg_options"] == ("a=1", "b=2")


def test_launchers_pass_every_argument_through():
    for script in ("tools/dist_build.sh", "tools/dist_train.sh"):
        text = (README.parent / script).read_text()
        assert text.rstrip().endswith('"$@"'), script


def test_train_help_lists_every_distillation_term():
    from click.testing import CliRunner

    from trainer.terms import TERMS

    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    listed = re.search(r"--kd TERM=WEIGHT,\.\.\. (.*?)Default:", help_text).group(1)
    assert {"crd", "infonce", "mse", "pkd", "heatmap", "reg", "label"} <= set(TERMS)
    for name in TERMS:
        assert re.search(rf"\b{name}\b", listed), (name, listed)


def test_readme_loss_names_are_the_logged_ones():
    # the trainer logs loss_kd_<term>_<key> and kd_valid_fraction_<key>, key = heads.head_key(student layer)
    from trainer.heads import head_key

    text = README.read_text()
    for name in (f"loss_kd_infonce_{head_key('pts_neck.0')}", f"kd_valid_fraction_{head_key('pts_neck.0')}",
                 f"loss_kd_heatmap_{head_key('pts_bbox_head.task_heads.0.heatmap')}"):
        assert f"`{name}`" in text, name
    written = re.findall(r"`((?:loss_kd|kd_valid_fraction)_[^`]*)`", text)
    assert written and not [name for name in written if "." in name], written
