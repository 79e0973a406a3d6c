"""``deepimaging levelset refine``: refine a segment of an image with Chan-Vese."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import InputError
from ..core.imageio import IMAGE_EXTENSIONS, read_image, require_extension
from ..core.progress import tqdm_progress
from ..core.segfile import SEGMENTATION_EXTENSIONS, Segmentation, read_segmentation, write_segmentation
from ..levelset import refine_defaults, refine_mask


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("levelset", help="level-set segmentation and refinement")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    refine = verbs.add_parser("refine", help="refine a segment with classic Chan-Vese",
                              description="Refine one segment of MASK on IMG and write it to OUT.")
    defaults = refine_defaults()
    refine.add_argument("--image", required=True, type=Path, help=f"image ({', '.join(IMAGE_EXTENSIONS)})")
    refine.add_argument("--mask", required=True, type=Path, help="label image or Slicer .seg.nrrd")
    refine.add_argument("--out", required=True, type=Path, help="output .seg.nrrd or label image")
    refine.add_argument("--segment", help="segment name to refine (needed when MASK has several)")
    refine.add_argument("--mu", type=float, default=defaults.mu, help="length weight (default %(default)s)")
    refine.add_argument("--lambda1", type=float, default=defaults.lambda1, help="inside fit weight")
    refine.add_argument("--lambda2", type=float, default=defaults.lambda2, help="outside fit weight")
    refine.add_argument("--iterations", type=int, default=defaults.max_iterations, help="iteration cap")
    refine.add_argument("--tolerance", type=float, default=defaults.tolerance, help="RMS phi change to stop at")
    refine.add_argument("--roi-margin", default="auto",
                        help="voxels around the segment to evolve in: auto (default), a number, or 'all'")
    refine.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    refine.set_defaults(func=run_refine)


def run_refine(args: argparse.Namespace) -> int:
    require_extension(args.out, SEGMENTATION_EXTENSIONS, "output segmentation")
    if args.out.resolve() in (args.image.resolve(), args.mask.resolve()):
        raise InputError("--out must not overwrite the input image or mask")
    image = read_image(args.image)
    segmentation = read_segmentation(args.mask)
    image.require_same_grid(segmentation.geometry, what="mask", of="image")
    segment = segmentation.segment(args.segment)
    params = refine_defaults()
    params.mu, params.lambda1, params.lambda2 = args.mu, args.lambda1, args.lambda2
    params.max_iterations, params.tolerance = args.iterations, args.tolerance
    margin = {"auto": "auto", "all": None}.get(args.roi_margin)
    if margin is None and args.roi_margin != "all":
        try:
            margin = int(args.roi_margin)
        except ValueError:
            raise InputError(f"--roi-margin must be auto, all or a number of voxels, got {args.roi_margin!r}") from None
    with tqdm_progress(f"refining '{segment.name}'") as progress:
        result = refine_mask(image, segment.mask, params, roi_margin=margin, device=args.device, progress=progress)
    out = Segmentation(segmentation.geometry)
    out.add(segment.name, result.mask, segment.color)
    write_segmentation(out, args.out)
    state = "converged" if result.converged else "stopped at the iteration cap"
    print(f"refined '{segment.name}' in {result.iterations} iterations ({state}); wrote {args.out}")
    return 0
