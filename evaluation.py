"""Evaluation helpers shared by classify_latents.py, tsne_plot.py and scripts/: loading a
checkpoint's data, encoding it, the classifier split, the latent classifiers, the swap accuracy and
the errors of swapped decodes."""
import hashlib
import os
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_loader import (DATA_ROOT_ENV, DEFAULT_DATA_ROOT, SPRITES_LAYERS, DataError, ImageSet, dataset_options,
                         load_dataset)
from networks import Classifier, ImageClassifier, reparameterize
from utils import checkpoint_dataset, code_version, display_images, model_images, training_args

Z_SOURCES = ("mean", "sample")  # z of an image: the mean of q(z|x), or one reparameterised draw


def eval_data_root(ckpt, data_root=None):
    """(data root, where it comes from) for a checkpoint's data: --data-root, else
    $DISENTANGLE_DATA_ROOT, else the folder the checkpoint was trained from, else ./data. The
    environment beats the checkpoint: a user who set it means it, and a file trained on another
    machine names a folder of that machine."""
    if data_root:
        return data_root, "--data-root"
    if os.environ.get(DATA_ROOT_ENV):
        return os.environ[DATA_ROOT_ENV], f"${DATA_ROOT_ENV}"
    recorded = (ckpt.get("args") or {}).get("data_root")
    if recorded:
        return recorded, "the checkpoint"
    return DEFAULT_DATA_ROOT, "the default"


def load_eval_data(ckpt, data_root=None, split="test"):
    """The ImageSet of `split` of the checkpoint's dataset, from the data root of eval_data_root."""
    root, source = eval_data_root(ckpt, data_root)
    try:  # dataset options (e.g. LINEMOD's BOP splits) as the checkpoint was trained with
        return load_dataset(checkpoint_dataset(ckpt), root, split, **dataset_options(ckpt.get("args") or {}))
    except DataError as e:
        if source == "--data-root":
            raise
        raise DataError(f"{e} (the data root comes from {source}; pass --data-root to use another)") from None


def weights_sha256(ckpt):
    """sha256 of the encoder's and decoder's tensors (names, dtypes, shapes, bytes): the same for a
    training checkpoint, its copies and its pretrained export, different for any other weights."""
    h = hashlib.sha256()
    for net in ("encoder", "decoder"):
        for name, t in sorted(ckpt[net].items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{net}.{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# The keys of a training run record; every other training argument goes under "flags".
RUN_KEYS = ("seed", "dataset", "recipe", "style_dim", "class_dim")


def training_run(ckpt, train_flags):
    """The record of the training run behind a checkpoint (or pretrained file), as far as the file
    holds it: seed, dataset, recipe, code sizes, every other argument that changes training
    ("flags"), step, epoch, the code version that wrote it, the checkpoint and its weights' hash.
    "unrecorded" names the training arguments the file does not hold (an older export); their
    values are unknown, not defaults. A value the file lacks is None. train_flags: the names of
    train.py's arguments that change training (classify_latents.train_flags)."""
    args = training_args(ckpt.get("args"))
    cfg = ckpt.get("model_config") or {}
    code = (ckpt.get("versions") or {}).get("code")
    return {**{k: args.get(k) for k in RUN_KEYS[:3]},
            "style_dim": cfg.get("style_dim", args.get("style_dim")),
            "class_dim": cfg.get("class_dim", args.get("class_dim")),
            "flags": {k: v for k, v in sorted(args.items()) if k not in RUN_KEYS},
            "unrecorded": [k for k in train_flags if k not in args],
            "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
            "code_version": code if code and code != "unknown" else None,
            "checkpoint": ckpt.get("path"), "weights_sha256": weights_sha256(ckpt)}


def model_run(model, train_flags):
    """training_run of a utils.TrainedModel: its checkpoint's record, its weights hashed as saved."""
    return training_run({**model.checkpoint, "encoder": model.encoder.state_dict(),
                         "decoder": model.decoder.state_dict()}, train_flags)


def evaluation_settings(seed, threads, device):
    """The evaluation's own settings, recorded apart from the training run's."""
    code = code_version()
    return {"seed": seed, "threads": threads, "device": str(device),
            "code_version": None if code == "unknown" else code}


def eval_seed(res):
    """The evaluation seed of a classify_latents.py JSON, new form or old (top-level "seed")."""
    return (res.get("evaluation") or {}).get("seed", res.get("seed"))


@torch.no_grad()
def encode_dataset(encoder, images_u8, batch_size=1000, z_source="mean", generator=None, cfg=None):
    """Codes of uint8 images (N, C, H, W) -> (z (N, style_dim), s (N, class_dim)) on the CPU.

    z is the mean of q(z|x), or with z_source="sample" one reparameterised draw
    mu + sigma * eps (the reference's README reports its accuracies "after reparameterization"),
    eps from `generator` (a CPU torch.Generator). An image's codes do not depend on its batch
    (instance norm; the authors' batch norm in eval mode), so batching changes nothing beyond
    float rounding.
    """
    if z_source not in Z_SOURCES:
        raise ValueError(f"z_source must be one of {Z_SOURCES}, got {z_source!r}")
    device = next(encoder.parameters()).device
    zs, ss = [], []
    for i in range(0, len(images_u8), batch_size):
        mu, logvar, s = encoder(model_images(images_u8[i:i + batch_size].to(device), cfg))
        if z_source == "sample":
            eps = torch.randn(mu.shape, generator=generator).to(device)
            mu = reparameterize(mu, logvar, eps)
        zs.append(mu.float().cpu())
        ss.append(s.float().cpu())
    return torch.cat(zs), torch.cat(ss)


@torch.no_grad()
def posterior_codes(encoder, images_u8, batch_size=1000, cfg=None):
    """mu and log-variance of q(z|x), and s, of uint8 images (N, C, H, W), on the CPU; images as the
    networks of `cfg` take them (model_images)."""
    device = next(encoder.parameters()).device
    out = [encoder(model_images(images_u8[i:i + batch_size].to(device), cfg))
           for i in range(0, len(images_u8), batch_size)]
    return tuple(torch.cat([o[k].float().cpu() for o in out]) for k in range(3))


def posterior_stats(mu, logvar):
    """Where q(z|x) = N(mu, sigma^2) sits against the prior N(0, I), averaged over images:
    mean sigma, mean |mu|, and KL(q(z|x) || N(0, I)) per dimension in nats (the reference recipe's
    training loss sums it over the code and divides by pixels instead). A dimension near 0 nats carries nothing."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # (N, D) nats
    return {"sigma_mean": torch.exp(0.5 * logvar).mean().item(), "abs_mu_mean": mu.abs().mean().item(),
            "kl_per_dim": kl.mean().item(), "kl_each_dim": kl.mean(0).tolist()}


def same_class_pairs(labels, num_pairs, generator):
    """num_pairs index pairs (i, j), i != j of the same class: i uniform over the images whose
    class has two or more, j uniform over the other images of that class. None if no class has two."""
    n = len(labels)
    order = torch.argsort(labels, stable=True)  # indices grouped by class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]  # each image's place within its class
    eligible = torch.nonzero(counts[labels] >= 2).flatten()
    if len(eligible) == 0:
        return None
    i = eligible[torch.randint(0, len(eligible), (num_pairs,), generator=generator)]
    c = labels[i]
    off = torch.randint(0, 2 ** 62, (num_pairs,), generator=generator) % (counts[c] - 1) + 1  # 1 .. n_c - 1
    return i, order[starts[c] + (rank[i] + off) % counts[c]]


@torch.no_grad()
def swap_errors(decoder, images_u8, labels, mu, s, num_pairs, seed, batch_size=1000, cfg=None):
    """Per-pixel mean squared error against x_i of dec(z_i, s_i) ("reconstruction") and of
    dec(z_i, s_j) for random same-class pairs i != j ("same_class_swap"), z = the mean mu of
    q(z|x). A z that carries no style cannot put x_i's style back, so its swap error is high.
    Both None (0 pairs) where no class has two images. Images in [0, 1] at the networks' size
    (display_images of model_images), so that both recipes' errors are on one scale."""
    device = next(decoder.parameters()).device
    pairs = same_class_pairs(labels, num_pairs, torch.Generator().manual_seed(seed))
    if pairs is None:
        return {"reconstruction": None, "same_class_swap": None, "pairs": 0}
    i, j = pairs
    total = {"reconstruction": 0.0, "same_class_swap": 0.0}
    for k in range(0, num_pairs, batch_size):
        bi, bj = i[k:k + batch_size], j[k:k + batch_size]
        x, z = display_images(model_images(images_u8[bi].to(device), cfg), cfg), mu[bi].to(device)
        for name, s_src in (("reconstruction", bi), ("same_class_swap", bj)):
            out = display_images(decoder(z, s[s_src].to(device)).float(), cfg)
            total[name] += (out - x).pow(2).flatten(1).mean(1).double().sum().item()
    return {**{k: v / num_pairs for k, v in total.items()}, "pairs": num_pairs}


def classes_are_shared(train_labels, test_labels):
    """The split rule: True when every class of the test split also occurs in the train split."""
    return bool(torch.isin(torch.unique(test_labels), torch.unique(train_labels)).all())


def per_class_split(labels, test_fraction, seed):
    """Seeded split of indices into (fit, test), within every class: round(test_fraction * n_c)
    of class c's n_c images go to test, so every class with two or more images is on both sides."""
    g = torch.Generator().manual_seed(seed)
    fit, test = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        if len(idx) >= 2:
            n_test = max(n_test, 1)
        test.append(idx[:n_test])
        fit.append(idx[n_test:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(test)).values


def identities(image_set):
    """Each image's identity, numbered over all splits: Sprites numbers identities 0..K-1 within each split,
    so its factors["identity"] holds the global number; elsewhere the label is the identity."""
    return image_set.factors.get("identity", image_set.labels)


def classifier_split(train_set, test_set, seed, test_fraction=0.2):
    """The images the latent classifiers are fitted on and tested on, by one rule for every dataset.

    - The test split's classes all occur in the train split (MNIST: the same ten digits):
      fit on the train split, test on the test split.
    - The test split holds classes the train split lacks (Sprites: identities unseen in
      training): a classifier cannot name a class it never saw, so the test split alone is
      the pool, split within each class (seeded, `test_fraction` of each class to the test
      side): every identity is on both sides, on disjoint images, and the encoder saw none of them.

    Returns (fit, test, description of the rule used); fit and test are (split, index) pairs:
    split "train" or "test", index a tensor of indices into that split, or None for all of it.
    """
    if classes_are_shared(identities(train_set), identities(test_set)):
        return ("train", None), ("test", None), "splits: classifiers fitted on the train split, tested on the test split"
    fit, test = per_class_split(test_set.labels, test_fraction, seed)
    return ("test", fit), ("test", test), (
        f"within-class: the test split's classes are unseen in training, so its images are split "
        f"within each class ({1 - test_fraction:.0%} fit / {test_fraction:.0%} test, seed {seed})")


def subset(image_set, index):
    """The images of `image_set` at `index` (a tensor of indices), or the set itself for None."""
    if index is None:
        return image_set
    return ImageSet(image_set.images[index], image_set.labels[index], image_set.num_classes,
                    {k: v[index] for k, v in image_set.factors.items()})


def classifier_sets(train_set, test_set, seed, test_fraction=0.2):
    """The fit and test ImageSets of classifier_split, and its rule."""
    splits = {"train": train_set, "test": test_set}
    (fit_split, fit), (test_split, test), rule = classifier_split(train_set, test_set, seed, test_fraction)
    return subset(splits[fit_split], fit), subset(splits[test_split], test), rule


# The attribute protocol (Sprites): a character's layer variants are its attributes. Unlike its
# identity, each attribute's values are shared between the splits (another character wears the
# same hair), so a classifier fitted on the train split's characters can be tested on the test
# split's unseen ones: the train and test columns of the published table (docs/evaluation.md).
ATTRIBUTES = SPRITES_LAYERS
ATTRIBUTE_RULE = ("attributes: classifiers fitted on the codes of the train split's characters, tested on those of "
                  "the test split's characters (unseen in training; their attributes are shared with the train split)")


def attribute_names(train_set, test_set):
    """The attributes classified by the attribute protocol: those both splits carry, with two or more
    values in the train split, where the test split's identities are unseen in training (rendered
    Sprites; not Reed's files, which lack layer labels, nor MNIST, whose own split already is train/test)."""
    if classes_are_shared(identities(train_set), identities(test_set)):
        return []
    return [n for n in ATTRIBUTES if n in integer_factors(train_set) and n in test_set.factors]


def integer_factors(image_set):
    """The names of the set's per-image integer factors with at least two values (others are skipped)."""
    return [k for k, v in image_set.factors.items()
            if torch.is_tensor(v) and v.dim() == 1 and not v.is_floating_point() and not v.is_complex()
            and len(torch.unique(v)) > 1]


def dense_labels(fit_labels, test_labels):
    """Labels renumbered 0..K-1 over the classes present in either set; returns (fit, test, K)."""
    classes, inverse = torch.unique(torch.cat([fit_labels, test_labels]), return_inverse=True)
    return inverse[:len(fit_labels)], inverse[len(fit_labels):], len(classes)


def chance_level(labels):
    """Accuracy of always answering the most frequent class of these labels."""
    return torch.bincount(labels).max().item() / len(labels)


def train_classifier(features, labels, num_classes, seed, epochs=10, batch_size=256, lr=1e-3):
    """The reference latent classifier (networks.Classifier) fitted with Adam on (features, labels).

    Deterministic for a seed: the weights and the batch order come from seeded generators, and
    the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(features.shape[1], num_classes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(features)
    for _ in tqdm(range(epochs), desc="latent classifier", unit="epoch", leave=False):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, inputs, batch_size=2000, cfg=None):
    """Arg-max class of each input (codes, or uint8 images converted batch by batch as the networks
    of `cfg` take them), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].to(device)
        out.append(model(model_images(x, cfg) if x.dtype == torch.uint8 else x).argmax(1).cpu())
    return torch.cat(out)


def accuracy(model, inputs, labels, batch_size=2000, cfg=None):
    return (predict(model, inputs, batch_size, cfg) == labels).float().mean().item()


def linear_probe(fit_x, fit_y, test_x, test_y, seed, max_iter=200):
    """Multinomial logistic regression on standardised codes (scikit-learn): (fit acc, test acc)."""
    from sklearn.linear_model import LogisticRegression  # here: scikit-learn is slow to import, the probe optional
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # too few iterations is a weaker probe, not an error
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        probe.fit(fit_x.numpy(), fit_y.numpy())
    return probe.score(fit_x.numpy(), fit_y.numpy()), probe.score(test_x.numpy(), test_y.numpy())


def train_image_classifier(images_u8, labels, num_classes, cfg, seed, steps=500, batch_size=128, lr=1e-3,
                           device="cpu"):
    """A plain CNN (networks.ImageClassifier) trained on real images, the judge of swapped images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(cfg, num_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    perm, pos = torch.randperm(len(labels), generator=g), 0
    for _ in tqdm(range(steps), desc="image classifier", unit="step", leave=False):
        if pos + batch_size > len(labels):
            perm, pos = torch.randperm(len(labels), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(model_images(images_u8[idx].to(device), cfg)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def random_pairs(n, num_pairs, generator):
    """num_pairs index pairs (i, j) with i != j, drawn uniformly from range(n)."""
    i = torch.randint(0, n, (num_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (num_pairs,), generator=generator)) % n  # j != i, uniform over the rest
    return i, j


@torch.no_grad()
def swap_accuracy(encoder, decoder, judge, images_u8, labels, num_pairs, seed, batch_size=1000, cfg=None):
    """How often a classifier of real images names the class of the s-source in a swapped image.

    For random pairs i != j: dec(z_i, s_j) with z_i the style mean of image i, and
    dec(z ~ N(0, I), s_j). Returns the share of each labelled class(j) ("swap", "prior"), and,
    among pairs of different classes, the share of dec(z_i, s_j) labelled class(i)
    ("style_leak": the class travelling with z instead of s). "by_class" splits "swap" and
    "prior" by class(j): one row per class of `labels`, its share None where no pair drew it.
    """
    device = next(decoder.parameters()).device
    style_dim = decoder.style_in.in_features
    g = torch.Generator().manual_seed(seed)
    i, j = random_pairs(len(labels), num_pairs, g)
    prior_z = torch.randn(num_pairs, style_dim, generator=g)
    hits = {"swap": [], "prior": [], "leak": []}
    for k in range(0, num_pairs, batch_size):
        bi, bj = i[k:k + batch_size], j[k:k + batch_size]
        mu, _, _ = encoder(model_images(images_u8[bi].to(device), cfg))
        _, _, s = encoder(model_images(images_u8[bj].to(device), cfg))
        swapped = judge(decoder(mu, s)).argmax(1).cpu()
        prior = judge(decoder(prior_z[k:k + batch_size].to(device), s)).argmax(1).cpu()
        hits["swap"].append(swapped == labels[bj])
        hits["prior"].append(prior == labels[bj])
        hits["leak"].append((swapped == labels[bi])[labels[bi] != labels[bj]])
    share = {k: torch.cat(v).float() for k, v in hits.items()}
    by_class = []
    for c in torch.unique(labels).tolist():
        drawn = labels[j] == c
        n = int(drawn.sum())
        by_class.append({"class": c, "pairs": n, **{k: share[k][drawn].mean().item() if n else None
                                                     for k in ("swap", "prior")}})
    return {"swap": share["swap"].mean().item(), "prior": share["prior"].mean().item(),
            "style_leak": share["leak"].mean().item() if len(share["leak"]) else float("nan"),
            "pairs": num_pairs, "by_class": by_class}
