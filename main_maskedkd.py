"""DeiT's main.py with MaskedKD: the teacher sees only the patches the student attends to.

    torchrun --nproc_per_node=8 main_maskedkd.py --model deit_small_patch16_224 \
        --teacher-model deit_base_patch16_224 --teacher-path teacher.pth --distillation-type soft \
        --keep-ratio 0.5 --data-path /imagenet --output_dir out/

Every DeiT command line works unchanged; the masking flags are new. ``--demo`` runs a small end-to-end
distillation on the built-in procedural dataset (no files, no downloads). This file only starts the application
in ``maskedkd_app/`` (``args.py`` the flags, ``build.py`` the parts, ``train.py`` the loop, ``cli.py`` the exit
codes); nothing imports it.
"""
import sys

from maskedkd_app.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
