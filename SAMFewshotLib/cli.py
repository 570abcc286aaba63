"""The ``samfewshot`` command line: segment, train, apply.

    samfewshot segment IMAGE LABELS -o OUTPUT [--model lite-medsam|vit_b:PATH|vit_l:PATH|vit_h:PATH]
                       [--device auto|cpu|cuda] [--axis auto|axial|coronal|sagittal] [--cache-dir DIR] [--seed N]
                       [--empty-slices N[,N...]] [--report REPORT.json]
    samfewshot train --image A --labels A_LABELS [--image B --labels B_LABELS ...] -o MODEL [--no-atlas]
    samfewshot apply MODEL IMAGE -o OUTPUT [--method auto|atlas|decoder]
    samfewshot click IMAGE --slice N [--point x,y[,label] ...] [--box x0,y0,x1,y1] -o OUTPUT
                     [--zero-shot [--tune-encoder STEPS]] [--learn-from LABELS] [--propagate] [--add-to LABELS]

Progress goes to stderr (silenced by --quiet); what was found and written goes to stdout. Exit status 0 on
success, 1 with a one-line error for anything the user can fix, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__
from .errors import Cancelled, InputError, SAMFewshotError

log = logging.getLogger("samfewshot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samfewshot",
        description="Segment a whole CT/MRI volume from a few painted slices with a few-shot adapted SAM.",
    )
    parser.add_argument("--version", action="version", version=f"samfewshot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{segment,train,apply,click}")

    def common(sub: argparse.ArgumentParser, axis_default: str = "auto") -> None:
        sub.add_argument("--model", default="lite-medsam",
                         help="lite-medsam (embedded, default) or vit_b:PATH, vit_l:PATH, vit_h:PATH (SAM checkpoint)")
        sub.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
        sub.add_argument("--axis", default=axis_default,
                         help="auto, axial, coronal or sagittal: the axis of the painted slices")
        sub.add_argument("--cache-dir", default=None,
                         help="where slice embeddings are cached (default: $SAMFEWSHOT_CACHE_DIR or the user cache)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    def adaptation(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--seed", type=int, default=0,
                         help="random seed, 0 to 2**63-1 (training is deterministic under it)")
        sub.add_argument("--window", default="auto",
                         help="intensity window: auto (robust percentiles), ct-soft-tissue, ct-bone or LOW,HIGH")
        sub.add_argument("--iterations", type=int, default=None,
                         help="fine-tuning iterations (default: 50/80/100 for 5/20/50 painted slices; segment "
                              "fine-tunes only for --report, --save-model or a method that predicts with the "
                              "decoder)")

    segment = commands.add_parser("segment", help="propagate painted slices to the whole volume")
    segment.add_argument("image", help="the volume (NIfTI, NRRD, MHA, ... or a DICOM series folder)")
    segment.add_argument("labels", help="label map in the image's geometry, painted on a few slices (0 = background)")
    segment.add_argument("-o", "--output", required=True, help="output label map (same geometry as the image)")
    common(segment)
    adaptation(segment)
    segment.add_argument("--method", default="default", help="default (= register-box-walk), register-box-walk, register-walk (the decoder alone beyond the painted range), fill-walk (contour interpolation inside the painted range), "
                         "seed (the paper's per-slice prediction) or seed-linked")
    segment.add_argument("--save-model", default=None, help="also save the adapted model to this file")
    segment.add_argument("--report", default=None,
                         help="also write per-slice confidence and the suggested next slice to this .json or .csv "
                              "(default method only)")
    segment.add_argument("--empty-slices", action="append", default=[], metavar="N[,N...]",
                         help="slices (indices along the painted axis, as in --report) where you checked that none "
                              "of the labels is present: they stay empty and propagation does not go past them. "
                              "Use it where the structure ends, or where --report suggested a slice it is absent from")

    train = commands.add_parser("train", help="adapt on painted slices of one or more volumes; save the model")
    train.add_argument("--image", action="append", required=True, help="a volume (repeat with --labels)")
    train.add_argument("--labels", action="append", required=True, help="its painted label map (same order)")
    train.add_argument("-o", "--output", required=True, help="adapted model file (.safetensors)")
    common(train)
    adaptation(train)
    train.add_argument("--no-atlas", action="store_true",
                       help="keep only the adapted decoder: no segmented copy of each volume to register onto new "
                            "ones (smaller file, faster training; 'apply' then runs the decoder)")

    apply = commands.add_parser("apply", help="segment a volume with a saved adapted model")
    apply.add_argument("model_file", metavar="MODEL", help="adapted model from 'samfewshot train' or --save-model")
    apply.add_argument("image", help="the volume to segment")
    apply.add_argument("-o", "--output", required=True, help="output label map")
    common(apply, axis_default="auto")
    apply.add_argument("--method", default="auto", choices=("auto", "atlas", "decoder"),
                       help="atlas: register the model's segmented training volumes onto this one; decoder: the "
                            "adapted decoder on every slice; auto (default): atlas if the model holds one")
    apply.set_defaults(model=None)

    click = commands.add_parser(
        "click", help="segment one slice from clicks or a box (plain SAM, zero-shot, or learned prompts)",
        description="Segment one slice from foreground/background clicks and/or a box. x is the slice's voxel "
                    "column and y its row (for an axial slice: the image's i and j indices). The output is a label "
                    "map with the mask on that slice (with --add-to: added to those painted labels, never "
                    "overwriting them), ready as painted slices for 'samfewshot segment'.")
    click.add_argument("image", help="the volume")
    click.add_argument("--slice", type=int, required=True, help="slice index along --axis")
    click.add_argument("--point", action="append", default=[], metavar="x,y[,label]",
                       help="a click: label 1 (default) foreground, 0 background; repeat for more")
    click.add_argument("--box", default=None, metavar="x0,y0,x1,y1", help="first and last column and row of a box")
    click.add_argument("-o", "--output", required=True, help="output label map (same geometry as the image)")
    click.add_argument("--label", type=int, default=1, help="label value of the mask (default 1)")
    click.add_argument("--add-to", default=None, metavar="LABELS",
                       help="painted label map to add the mask to (its painted voxels are kept as they are)")
    click.add_argument("--zero-shot", action="store_true",
                       help="from foreground clicks only: a coarse mask from the self-similarity of the image "
                            "embedding at the clicks becomes SAM's prompt (Shaharabany et al.)")
    click.add_argument("--tune-encoder", type=int, default=0, metavar="STEPS",
                       help="with --zero-shot: fine-tune a copy of the image encoder on this slice for STEPS steps "
                            "(BCE + Dice to the coarse mask; the paper uses 100, meant for a GPU)")
    click.add_argument("--learn-from", default=None, metavar="LABELS",
                       help="learn the prompt encoder from the slices painted with --label in this label map "
                            "first (SAM-assist prompt learning), then decode the clicks with it")
    click.add_argument("--propagate", action="store_true",
                       help="walk the mask to the neighbouring slices, each slice's points prompting the next "
                            "(SAM-auto prompt propagation), and write the whole volume")
    common(click)
    click.add_argument("--seed", type=int, default=0, help="random seed (prompt learning, propagation sampling)")
    click.add_argument("--window", default="auto",
                       help="intensity window: auto (robust percentiles), ct-soft-tissue, ct-bone or LOW,HIGH")
    return parser


class Progress:
    """One tqdm bar per stage on stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None or total != self.bar.total or done < self.bar.n:
            self.close()
            self.stage = stage
            unit = "it" if stage.startswith("adapting") else "gap" if stage == "registering" else "slice"
            self.bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def torch_out_of_memory() -> tuple[type[BaseException], ...]:
    """torch.OutOfMemoryError, without importing torch for --help (it takes seconds)."""
    torch = sys.modules.get("torch")
    return (torch.OutOfMemoryError,) if torch is not None and hasattr(torch, "OutOfMemoryError") else ()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="samfewshot: warning: %(message)s", stream=sys.stderr)
    progress = Progress(args.quiet)
    try:
        if not 0 <= getattr(args, "seed", 0) < 2**63:  # what PyTorch and NumPy both accept
            raise InputError(f"--seed {args.seed}: use a whole number from 0 to 2**63-1.")
        return {"segment": _segment, "train": _train, "apply": _apply, "click": _click}[args.command](args, progress)
    except Cancelled as error:
        print(f"samfewshot: {error}", file=sys.stderr)
        return 130
    except SAMFewshotError as error:
        progress.close()
        print(f"samfewshot: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("samfewshot: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except torch_out_of_memory():
        # the encoder falls back to smaller batches and the CPU by itself; the decoder's fine-tuning does not
        progress.close()
        print("samfewshot: error: the GPU ran out of memory while adapting the decoder; close other GPU programs "
              "or run with --device cpu.", file=sys.stderr)
        return 1
    except MemoryError:
        progress.close()
        print("samfewshot: error: out of memory; close other programs or use a smaller volume.", file=sys.stderr)
        return 1
    except Exception as error:  # an unexpected fault: one line, the traceback only on request
        progress.close()
        if os.environ.get("SAMFEWSHOT_DEBUG"):
            raise
        print(f"samfewshot: internal error: {type(error).__name__}: {error} (set SAMFEWSHOT_DEBUG=1 for details; "
              "please report it)", file=sys.stderr)
        return 1
    finally:
        progress.close()


def _segment(args, progress: Progress) -> int:
    from .pipeline import WALK_METHODS, WITHOUT_DECODERS, resolve_method, segment_volume
    from .volume_io import check_output_path, read_label_map, read_volume, write_label_map

    inputs = [args.image, args.labels] + ([args.save_model] if args.save_model else [])
    output = check_output_path(args.output, inputs[:2])
    if args.save_model:
        check_output_path(args.save_model, inputs[:2] + [args.output])
    if args.report:
        check_output_path(args.report, inputs[:2] + [args.output] + ([args.save_model] if args.save_model else []))
        if args.method not in ("default",) + WALK_METHODS:
            raise InputError(f"--report needs the default method or one of {', '.join(WALK_METHODS)}: confidence "
                             "comes from their walk.")
    empty_slices = parse_slice_list(args.empty_slices, "--empty-slices")
    image = read_volume(args.image)
    labels = read_label_map(args.labels, image)
    started = time.perf_counter()
    # the default method's labels do not need the adapted decoders: train them only for what uses them
    with_decoders = bool(args.save_model or args.report) or resolve_method(args.method) not in WITHOUT_DECODERS
    result = segment_volume(image, labels.array, model=args.model, device=args.device, axis=args.axis,
                            cache_dir=args.cache_dir, seed=args.seed, method=args.method, window=args.window,
                            iterations=args.iterations, progress=progress, empty_slices=empty_slices,
                            with_decoders=with_decoders)
    progress.close()
    print(f"found {result.painted.describe()}")
    write_label_map(result.labels, image, output)
    if args.save_model:
        result.adapted.add_atlas(image, result.labels)  # this volume, segmented, to register onto others
        result.adapted.save(args.save_model)
        print(f"saved adapted model to {args.save_model}")
    if args.report:
        from .confidence import per_slice, write_report

        write_report(args.report, result.confidence, result.painted.axis_name, result.suggested_slice)
        lowest = sorted(per_slice(result.confidence).items(), key=lambda item: item[1])[:3]
        weakest = ", ".join(f"{index} ({value:.2f})" for index, value in lowest)
        print(f"wrote {args.report}: least confident {result.painted.axis_name} slices {weakest}; "
              f"paint slice {result.suggested_slice} next")
    cached = ", all embeddings from the cache" if result.encoded_slices == 0 else ""
    print(f"wrote {output} ({time.perf_counter() - started:.1f} s; encoded {result.encoded_slices} slices{cached})")
    return 0


def parse_slice_list(values: list[str], option: str) -> list[int]:
    """``["12,80", "81"]`` -> [12, 80, 81]."""
    out = []
    for text in values:
        for part in text.split(","):
            part = part.strip()
            if not part.isdigit():
                raise InputError(f"{option} {text}: give slice indices as whole numbers, e.g. {option} 12,80.")
            out.append(int(part))
    return out


def _train(args, progress: Progress) -> int:
    from .pipeline import train_adapted_model
    from .volume_io import check_output_path, read_label_map, read_volume

    if len(args.image) != len(args.labels):
        raise SAMFewshotError(f"give one --labels per --image ({len(args.image)} images, {len(args.labels)} label maps).")
    output = check_output_path(args.output, args.image + args.labels)
    pairs = []
    for image_path, labels_path in zip(args.image, args.labels):
        image = read_volume(image_path)
        pairs.append((image, read_label_map(labels_path, image).array))
    adapted = train_adapted_model(pairs, model=args.model, device=args.device, axis=args.axis,
                                  cache_dir=args.cache_dir, seed=args.seed, window=args.window,
                                  iterations=args.iterations, progress=progress,
                                  atlases=not args.no_atlas)
    progress.close()
    adapted.save(output)
    print(f"adapted on {adapted.settings['support_slices']} painted {adapted.axis_name} slices of "
          f"{len(pairs)} volume(s), labels {', '.join(map(str, sorted(adapted.targets)))}; saved {output}")
    return 0


def _apply(args, progress: Progress) -> int:
    from .adapted_model import AdaptedModel
    from .pipeline import applies_atlases, apply_adapted_model
    from .volume_io import check_output_path, read_volume, write_label_map

    output = check_output_path(args.output, [args.model_file, args.image])
    adapted = AdaptedModel.load(args.model_file)
    image = read_volume(args.image)
    labels = apply_adapted_model(adapted, image, model=args.model, device=args.device, axis=args.axis,
                                 cache_dir=args.cache_dir, progress=progress, method=args.method)
    progress.close()
    write_label_map(labels, image, output)
    labels_found = ", ".join(adapted.label_names.get(v, str(v)) for v in sorted(adapted.targets))
    how = (f"by registering its {len(adapted.atlases)} atlas(es)" if applies_atlases(adapted, args.method)
           else f"with its decoder along the {adapted.axis_name} axis")
    print(f"segmented {labels_found} {how} ({args.model_file}); wrote {output}")
    return 0


def _click(args, progress: Progress) -> int:
    from .interactive import InteractiveSession
    from .prompts import SlicePrompt
    from .volume_io import check_output_path, read_label_map, read_volume, write_label_map

    inputs = [args.image] + [path for path in (args.add_to, args.learn_from) if path]
    output = check_output_path(args.output, inputs)
    prompt = SlicePrompt.parse(args.point, args.box)
    if args.tune_encoder and not args.zero_shot:
        raise InputError("--tune-encoder goes with --zero-shot (it fine-tunes the encoder to the coarse mask).")
    if not 0 <= args.tune_encoder <= 10_000:
        raise InputError(f"--tune-encoder {args.tune_encoder}: use 0 to 10000 steps.")
    if args.zero_shot and args.learn_from:
        raise InputError("choose --zero-shot (no painted slices) or --learn-from LABELS (painted slices), not both.")
    if not 1 <= args.label <= 255:
        raise InputError(f"--label {args.label}: use a whole number from 1 to 255.")
    image = read_volume(args.image)
    painted = read_label_map(args.add_to, image).array if args.add_to else None
    session = InteractiveSession(image, axis=args.axis, model=args.model, device=args.device,
                                 cache_dir=args.cache_dir, window=args.window, progress=progress)
    session.check_index(args.slice)
    prompt.check(session.slice_shape)
    started = time.perf_counter()
    prompt_encoder = None
    if args.learn_from:
        from .prompt_learning import learn_prompt_encoder

        examples = read_label_map(args.learn_from, image).array
        prompt_encoder = learn_prompt_encoder(session, examples, args.label, seed=args.seed, progress=progress)
    if args.zero_shot:
        from .zero_shot import zero_shot_segment

        result = zero_shot_segment(session, args.slice, prompt, tune_encoder_steps=args.tune_encoder,
                                   seed=args.seed, progress=progress)
    else:
        result = session.segment(args.slice, prompt, prompt_encoder=prompt_encoder)
    masks = [result]
    if args.propagate:
        from .prompt_propagation import walk_prompts

        masks = walk_prompts(session, result, prompt_encoder=prompt_encoder, seed=args.seed, progress=progress).masks
    progress.close()
    labels = session.add_to_labels(masks, args.label, painted)
    write_label_map(labels, image, output)
    voxels = int(sum(item.mask.sum() for item in masks))
    where = (f"{len([m for m in masks if m.mask.any()])} {session.axis_name} slices" if args.propagate
             else f"{session.axis_name} slice {args.slice}")
    print(f"{voxels} voxels on {where} as label {args.label}; wrote {output} "
          f"({time.perf_counter() - started:.1f} s; encoded {session.embeddings.encoded_slices} slices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
