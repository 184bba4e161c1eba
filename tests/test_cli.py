import subprocess
import sys

from distill.cli import STAGES, build_parser


def test_distill_help_lists_each_stage_without_importing_torch():
    out = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command, _, _ in STAGES:
        assert command in out.stdout
    check = "import sys; from distill.cli import build_parser; build_parser(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_registered_subcommand_has_help():
    for command, _, summary in STAGES:
        parser = build_parser([command])
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        p = sub.choices[command]
        text = p.format_help()
        assert command in text and len(text) > 80
        assert sub._choices_actions[[c for c, _, _ in STAGES].index(command)].help == summary


def test_verbose_flag_after_the_subcommand_and_train_module_usage():
    assert build_parser(["run", "-v", "r.yaml"]).parse_args(["run", "-v", "r.yaml"]).verbose
    assert build_parser(["chat-vector"]).parse_args(["chat-vector", "extract", "-v", "--base", "b", "--post", "p",
                                                     "--out", "o"]).verbose
    assert not build_parser(["run"]).parse_args(["run", "r.yaml"]).verbose
    usage = subprocess.run([sys.executable, "-m", "distill.train", "--help"], capture_output=True, text=True).stdout
    assert usage.startswith("usage: python -m distill.train [-h] --model")  # no stray `train` word
