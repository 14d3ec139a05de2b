#!/usr/bin/env python
"""Convert a KS-DETR checkpoint into the plain student (baseline) checkpoint.

    python tools/ks_to_student.py output/model_final.pth ks_student.pth
    python train_net.py --config-file configs/conditional_detr_r50.yaml --eval-only MODEL.WEIGHTS ks_student.pth

The output loads strictly into the baseline config and gives the KS model's eval outputs.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr.checkpoint import load_checkpoint, student_state_dict  # noqa: E402
from ks_detr.errors import report_user_errors  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="KS checkpoint (.pth written by train_net.py)")
    parser.add_argument("output", help="where to write the student checkpoint")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with report_user_errors(args.debug):
        run(parser, args)


def run(parser, args):
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        parser.error(f"output {args.output!r} would overwrite the input")
    model, teacher_only = load_checkpoint(args.input, with_teacher_keys=True)
    student = student_state_dict(model, teacher_only)  # train_net's checkpoints list their teacher keys
    dropped = sorted(set(model) - set(student))
    if not dropped:
        parser.error(f"{args.input} has no teacher parameters: is it a KS checkpoint?")
    torch.save({"model": student}, args.output)
    print(f"wrote {args.output}: {len(student)} tensors kept, {len(dropped)} teacher-only dropped")
    for k in dropped:
        print("  dropped", k)


if __name__ == "__main__":
    main()
