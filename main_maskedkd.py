"""DeiT's main.py with MaskedKD: the teacher sees only the patches the student attends to.

    torchrun --nproc_per_node=8 main_maskedkd.py --model deit_small_patch16_224 \
        --teacher-model deit_base_patch16_224 --teacher-path teacher.pth --distillation-type soft \
        --keep-ratio 0.5 --data-path /imagenet --output_dir out/

Every DeiT command line works unchanged; the masking flags are new. ``--demo`` runs a small end-to-end
distillation on the built-in procedural dataset (no files, no downloads). The application lives in
``maskedkd_app/`` (``args.py`` the flags, ``build.py`` the parts, ``train.py`` the loop, ``cli.py`` the exit codes).
"""
import argparse  # noqa: F401 (tests reach it through this module until they import the app)
import sys

from maskedkd_app.cli import cli

# Until the callers import the application directly (next commit).
from maskedkd_app.args import check_args, get_args_parser  # noqa: F401
from maskedkd_app.build import build_criterion, create_teacher, load_weights  # noqa: F401
from maskedkd_app.train import main  # noqa: F401


def run_demo(args, cfg=None) -> dict:
    from maskedkd_app.demo import run_demo as demo
    parser = argparse.ArgumentParser("demo phase", parents=[get_args_parser()])
    return demo(args, main, parser.parse_args, cfg=cfg)


if __name__ == "__main__":
    sys.exit(cli())
