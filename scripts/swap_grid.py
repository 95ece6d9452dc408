"""The paper's swap figure from a checkpoint: cell (i, j) is dec(z of row image i, s of column image j).

    python scripts/swap_grid.py --checkpoint runs/mnist/checkpoints/last.pt --num-rows 8 --num-cols 8 --out figs/swap
    python scripts/swap_grid.py --checkpoint CKPT --rows 0,5,9 --cols 1,2,3,4 --prior-rows 2 --out figs/swap

Writes FILE.png (at --dpi) and FILE.pdf. The top row shows the images giving the class code s,
the left column those giving the style z (the mean of q(z|x)); the corner is blank: it and the
figure's background take the images' background colour (black for MNIST).
--prior-rows adds rows decoded from z ~ N(0, I) instead of an image's style.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation import load_eval_data  # noqa: E402
from utils import (HelpFormatter, UserError, atomic_write, display_images, load_model,  # noqa: E402
                   model_images, pick_device, run_cli, swap_grid)


def get_args_parser():
    p = argparse.ArgumentParser(description="Render the swap grid figure of a checkpoint as PNG and PDF.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (or run directory)")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--rows", default=None, help="comma-separated indices of the images giving z (rows)")
    rows.add_argument("--num-rows", type=int, default=8, help="number of random images giving z")
    cols = p.add_mutually_exclusive_group()
    cols.add_argument("--cols", default=None, help="comma-separated indices of the images giving s (columns)")
    cols.add_argument("--num-cols", type=int, default=8, help="number of random images giving s")
    p.add_argument("--prior-rows", type=int, default=0, help="extra rows with z ~ N(0, I)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images and of the prior rows")
    p.add_argument("--split", default="test", help="dataset split the images come from")
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $DISENTANGLE_DATA_ROOT, else the checkpoint's, else ./data)")
    p.add_argument("--out", required=True, help="output path without extension: writes OUT.png and OUT.pdf")
    p.add_argument("--dpi", type=int, default=300, help="resolution of the PNG")
    p.add_argument("--cell-inches", type=float, default=0.45, help="printed size of one image")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def parse_indices(text, n, flag):
    try:
        idx = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not idx:
        raise UserError(f"{flag} is empty")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise UserError(f"{flag}: index {bad[0]} is out of range (the split holds {n} images)")
    return torch.tensor(idx)


def choose(text, count, n, flag, generator):
    """Indices given by the user, or `count` distinct random ones."""
    if text is not None:
        return parse_indices(text, n, flag)
    if not 0 < count <= n:
        raise UserError(f"--num-{flag[2:]} must lie in 1..{n}, got {count}")
    return torch.randperm(n, generator=generator)[:count]


@torch.no_grad()
def build_grid(encoder, decoder, x_rows, x_cols, prior_rows, generator):
    """(1 + rows + prior_rows, 1 + cols, C, H, W): utils.swap_grid, plus rows decoded from z ~ N(0, I)."""
    grid = swap_grid(encoder, decoder, x_rows, x_cols)
    if prior_rows:
        _, _, s = encoder(x_cols)
        z = torch.randn(prior_rows, decoder.style_in.in_features, generator=generator).to(s.device)
        cells = decoder(z.repeat_interleave(len(x_cols), 0), s.repeat(prior_rows, 1))
        extra = torch.ones(prior_rows, *grid.shape[1:], device=grid.device)
        extra[:, 1:] = cells.view(prior_rows, len(x_cols), *cells.shape[1:])
        grid = torch.cat([grid, extra])
    return grid.cpu()


def canvas(grid, sep=1, sep_value=0.75):
    """One (H', W', 3) array of the grid's cells with `sep`-pixel grey lines between them."""
    rows, cols, c, h, w = grid.shape
    img = grid.expand(-1, -1, 3, -1, -1) if c == 1 else grid[:, :, :3]
    out = np.full((rows * h + (rows - 1) * sep, cols * w + (cols - 1) * sep, 3), sep_value, dtype=np.float32)
    for r in range(rows):
        for k in range(cols):
            out[r * (h + sep):r * (h + sep) + h, k * (w + sep):k * (w + sep) + w] = \
                img[r, k].permute(1, 2, 0).clamp(0, 1).numpy()
    return out


def render(grid, n_rows, prior_rows, out, dpi, cell_inches):
    """Save the grid as OUT.png and OUT.pdf: no axes, thin separators, prior rows labelled."""
    import matplotlib  # here: slow to import, only the figure needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img = canvas(grid)
    n_r, n_c = grid.shape[:2]
    # The figure's background is the empty corner's colour, so a margin left by the aspect ratio matches it.
    fig = plt.figure(figsize=(n_c * cell_inches, n_r * cell_inches), facecolor=tuple(img[0, 0]))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    h = grid.shape[3] + 1
    for r in range(1 + n_rows, n_r):  # the left cell of a prior row names its z
        ax.text(grid.shape[4] / 2, r * h + h / 2, "z ~\nN(0, I)", ha="center", va="center",
                fontsize=max(4.0, 9 * cell_inches / 0.45), color="0.2")
    paths = [f"{out}.png", f"{out}.pdf"]
    for path in paths:
        with atomic_write(path, "the swap grid") as f:
            fig.savefig(f, format=path[-3:], dpi=dpi)
    plt.close(fig)
    return paths


def main(args):
    if args.prior_rows < 0 or args.dpi <= 0 or args.cell_inches <= 0:
        raise UserError("--prior-rows must be >= 0, --dpi and --cell-inches positive")
    out = os.path.splitext(args.out)[0] if args.out.endswith((".png", ".pdf")) else args.out
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    ckpt, cfg, encoder, decoder = model.checkpoint, model.cfg, model.encoder, model.decoder
    data = load_eval_data(ckpt, args.data_root, args.split)
    g = torch.Generator().manual_seed(args.seed)
    rows = choose(args.rows, args.num_rows, len(data), "--rows", g)
    cols = choose(args.cols, args.num_cols, len(data), "--cols", g)
    grid = build_grid(encoder, decoder, model_images(data.images[rows].to(device), cfg),
                      model_images(data.images[cols].to(device), cfg), args.prior_rows, g)
    grid = display_images(grid, cfg)  # [0, 1] whatever range the networks work in
    paths = render(grid, len(rows), args.prior_rows, out, args.dpi, args.cell_inches)
    print(f"wrote {' and '.join(paths)} (rows {rows.tolist()}, columns {cols.tolist()})")
    return paths


if __name__ == "__main__":
    run_cli(main, get_args_parser())
