"""`part-fast show-cam`: its parser and the command (budget-map overlays of a run's test images, a PNG)."""
from __future__ import annotations

from pathlib import Path

from ..devices import AUTO, parse_device
from ..errors import ConfigError
from .common import (DEVICE_HELP, add_weights_flag, announced_device, create_folder_of, load_announced, run_test_loader,
                     with_default, writing)


def show_cam_parser(sub) -> None:
    p = sub.add_parser("show-cam", help="budget-map overlays for a few test images (PNG)")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--out", default="cams.png", help=with_default("the PNG to write (its folder is created)",
                                                                  "cams.png"))
    p.add_argument("--n", type=int, default=8, help=with_default("number of test images", 8))
    p.add_argument("--data-dir", default=None, help=with_default("dataset folder", "the run's"))
    p.add_argument("--mask", default=None, choices=("jet", "cam"), help=with_default("budget mask", "the run's"))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))
    add_weights_flag(p)


def cmd_show_cam(args) -> int:
    import torch

    from ..budget import PixelBudget
    from ..models import CAM_LAYERS
    from ..plots import BUDGET_PNG, budget_overlay_png, budget_title, require_matplotlib

    parse_device(args.device)  # names before numbers
    require_matplotlib(BUDGET_PNG)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    device = announced_device("show-cam", args.device)
    model, config = load_announced("show-cam", args.checkpoint, device, args.weights)
    _, test_set, data_info = run_test_loader(config, args.data_dir, args.n, args.n)
    n = min(args.n, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)]).to(device)
    config = config.resolved()
    budget = PixelBudget(config.eps, config.eps_low, config.cam, args.mask or config.mask, layer=CAM_LAYERS.get(config.arch))
    eps_maps = budget(model, images)
    with torch.no_grad():
        pred = model(images).argmax(1).tolist()
    titles = [f"{data_info.classes[test_set[i][1]]}\npred {data_info.classes[p]}" for i, p in enumerate(pred)]
    from .. import data as data_mod

    masks = data_mod.object_mask_of(test_set)
    out = Path(args.out)
    create_folder_of(out, "--out")
    with writing(out, "--out"):
        path = budget_overlay_png(out, images, eps_maps, config.eps, titles, None if masks is None else masks[:n],
                                  suptitle=budget_title(config.arch, config.cam, args.mask or config.mask, config.eps, config.eps_low))
    print(f"wrote {path}")
    return 0
