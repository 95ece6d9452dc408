"""t-SNE map of the style code z or the class code s of test images, coloured by class.

    python tsne_plot.py --checkpoint runs/mnist/checkpoints/last.pt --space s --num-points 2000 --out s.png

A disentangled model shows one cluster per class in s and no class structure in z.
The embedding is openTSNE's t-SNE, seeded (Barnes-Hut below 10,000 points, FFT-accelerated above).
"""
import argparse
import os

import numpy as np
import torch

from evaluation import Z_SOURCES, encode_dataset, integer_factors, load_eval_data
from utils import HelpFormatter, UserError, atomic_write, load_model, pick_device, run_cli

LEGEND_MAX = 20  # more classes than this get a colour bar instead of a legend


def get_args_parser():
    p = argparse.ArgumentParser(description="t-SNE embedding of z or s for test images, coloured by class.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (or run directory)")
    p.add_argument("--space", default="s", choices=["z", "s"], help="the code to embed")
    p.add_argument("--z-source", default="mean", choices=Z_SOURCES,
                   help="z = the mean of q(z|x), or one reparameterised draw from it")
    p.add_argument("--num-points", type=int, default=2000, help="images of --split embedded (a seeded random subset)")
    p.add_argument("--split", default="test", help="dataset split the images come from")
    p.add_argument("--color-by", default="class",
                   help="'class', or the name of one of the dataset's integer factors (Sprites: action, hair, ...)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (lowered for few points)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of openTSNE and torch (more help only on an otherwise idle machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $DISENTANGLE_DATA_ROOT, else the checkpoint's, else ./data)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--dpi", type=int, default=200)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def embed(codes, perplexity, seed, threads):
    """2-D openTSNE embedding (N, 2) of codes (N, D)."""
    from openTSNE import TSNE  # here: slow to import, and the plot alone needs it
    n = len(codes)
    perplexity = min(perplexity, (n - 1) / 3)  # t-SNE needs about 3 x perplexity neighbours per point
    tsne = TSNE(perplexity=perplexity, n_jobs=threads, random_state=seed, verbose=False)
    return np.asarray(tsne.fit(codes.double().numpy()))


def plot(xy, labels, title, legend_title, path, dpi):
    import matplotlib  # here: slow to import, and tests call the rest without plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = np.unique(labels)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if len(classes) <= LEGEND_MAX:
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for k, c in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(k), label=str(c), linewidths=0, rasterized=True)
        ax.legend(title=legend_title, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=4, c=labels, cmap="turbo", linewidths=0, rasterized=True)
        fig.colorbar(sc, ax=ax, label=legend_title)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_write(path, "the t-SNE plot") as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=dpi)
    plt.close(fig)


def main(args):
    if args.num_points < 4:
        raise UserError(f"--num-points must be at least 4, got {args.num_points}")
    if args.threads <= 0 or args.perplexity <= 0:
        raise UserError("--threads and --perplexity must be positive")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    ckpt, cfg, encoder = model.checkpoint, model.cfg, model.encoder
    data = load_eval_data(ckpt, args.data_root, args.split)
    if args.color_by == "class":
        labels = data.labels
    elif args.color_by in integer_factors(data):
        labels = data.factors[args.color_by]
    else:
        raise UserError(f"--color-by {args.color_by}: choose class or one of the dataset's integer factors "
                        f"({', '.join(integer_factors(data)) or 'it has none'})")

    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=g)[:args.num_points]
    z, s = encode_dataset(encoder, data.images[idx], z_source=args.z_source, generator=g, cfg=cfg)
    xy = embed(z if args.space == "z" else s, args.perplexity, args.seed, args.threads)
    what = "style code z" + (" (sampled)" if args.z_source == "sample" else "") if args.space == "z" \
        else "class code s"
    ckpt_name = ckpt["path"]  # as given on the command line: a figure names no folder of this machine
    plot(xy, labels[idx].numpy(), f"t-SNE of the {what}: {len(idx)} {args.split} images\n"
         f"{ckpt_name} (step {ckpt.get('step')})", args.color_by, args.out, args.dpi)
    print(f"wrote {args.out}")
    return xy


if __name__ == "__main__":
    run_cli(main, get_args_parser())
