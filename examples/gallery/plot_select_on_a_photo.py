"""
Selecting tokens on a photo
===========================

A vision tower such as CLIP ViT-L/14 at 336 px cuts an image into a 24 x 24 grid of patches and
hands the LLM one token per patch: 576 visual tokens. A pruning method keeps a few of them. This
example cuts a real photo into that grid and lets five registered methods choose 64 of the 576
tokens with :func:`tokenprune.select`, which works on plain tensors.

The features here are a stand-in for a vision tower's: each patch's mean colour and a fixed random
projection of its pixels. They are enough to tell sky from trees from roof tiles, which is what
the similarity-based methods need. The relevance map, a stand-in for the attention of a question
to the image, is a bump centred on the pagoda.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import tokenprune as tp

# %%
# The photo as a 24 x 24 grid of patches
# --------------------------------------
# ``china.jpg`` (640 x 427) ships with scikit-learn. As a LLaVA processor does, we resize it to
# 336 x 336, so that each of the 24 x 24 patches is 14 x 14 pixels.

GRID, PATCH = 24, 14
photo = load_sample_images().images[0]  # uint8 [427, 640, 3]
height, width = photo.shape[:2]
square = np.asarray(Image.fromarray(photo).resize((GRID * PATCH, GRID * PATCH), Image.BICUBIC))
pixels = square.astype(np.float32) / 255.0

# [rows, cols, 14, 14, 3] -> one row of 14 * 14 * 3 pixel values per patch, in row-major order
patches = pixels.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(GRID * GRID, -1)
print("patches:", patches.shape)

# %%
# Stand-in features and relevance
# -------------------------------
# Features: mean colour (3 values) and a seeded random projection of the centred pixels (61 values),
# 64 dimensions in all. Relevance: a Gaussian bump over the grid, centred on the pagoda.

rng = np.random.default_rng(0)
mean_colour = patches.reshape(-1, PATCH * PATCH, 3).mean(1)                    # [576, 3]
projection = rng.standard_normal((patches.shape[1], 61)) / np.sqrt(patches.shape[1])
texture = (patches - patches.mean(1, keepdims=True)) @ projection              # [576, 61]
features = torch.tensor(np.concatenate([mean_colour, texture], 1), dtype=torch.float32)[None]  # [1, 576, 64]

rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
centre = (11.0, 7.5)  # (row, col) of the pagoda on the grid
relevance = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 4.0**2))
relevance = torch.tensor(relevance, dtype=torch.float32)[None]                 # [1, 576]
print("features:", tuple(features.shape), "relevance:", tuple(relevance.shape))

# %%
# Five methods, one budget
# ------------------------
# Each method is built by name with :func:`tokenprune.create_method`. ``fastervlm`` keeps the most
# relevant tokens, ``divprune`` the most diverse ones (max-min distance between features), ``tops``
# trades relevance against coverage and diversity (``schedule="single"``: one stage, before the
# LLM, instead of TOPS's multi-stage schedule), ``random`` is the floor, and ``pooling`` averages
# 3 x 3 windows of the grid (it needs the ``grid`` signal). Signals a method does not read are
# ignored, so every call passes the same ones.

BUDGET = 64
methods = {
    "fastervlm": tp.create_method("fastervlm", budget=BUDGET),
    "divprune": tp.create_method("divprune", budget=BUDGET),
    "tops": tp.create_method("tops", budget=BUDGET, schedule="single"),
    "random": tp.create_method("random", budget=BUDGET, seed=0),
    "pooling": tp.create_method("pooling", budget=BUDGET),
}
kept = {}
for name, method in methods.items():
    selection = tp.select(method, features, budget=BUDGET, relevance=relevance, grid=(GRID, GRID))
    kept[name] = selection.indices[0][selection.valid[0]].numpy()
    print(f"{name:>9}: kept {len(kept[name])} of {GRID * GRID}, first indices {kept[name][:8].tolist()}")

# %%
# The kept patches
# ----------------
# Kept patches are drawn at full brightness, the others dimmed. The photo is drawn at its own
# aspect ratio (the grid itself is square). For ``pooling`` each kept token stands for a 3 x 3
# window, whose mean features it carries (``Selection.features``); the marked patch is the one
# nearest the window's centre.


def show_kept(ax, keep, title):
    """The resized photo with the patches not in ``keep`` dimmed."""
    mask = np.zeros(GRID * GRID, dtype=bool)
    mask[keep] = True
    shade = np.where(mask.reshape(GRID, GRID), 1.0, 0.25)
    shade = np.kron(shade, np.ones((PATCH, PATCH)))[..., None]  # patch mask -> pixel mask
    ax.imshow(pixels * shade, extent=(0, GRID, GRID, 0))
    ax.set_aspect(height / width)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


fig, axes = plt.subplots(2, 3, figsize=(10, 5.2))
axes = axes.ravel()
axes[0].imshow(pixels, extent=(0, GRID, GRID, 0))
axes[0].imshow(relevance[0].reshape(GRID, GRID), extent=(0, GRID, GRID, 0), cmap="magma", alpha=0.55)
axes[0].set_aspect(height / width)
axes[0].set_title("relevance (stand-in)", fontsize=10)
axes[0].set_axis_off()
for ax, (name, keep) in zip(axes[1:], kept.items()):
    show_kept(ax, keep, f"{name}: {len(keep)} of {GRID * GRID}")
fig.suptitle(f"{BUDGET} of {GRID * GRID} visual tokens kept by five methods")
fig.tight_layout()
plt.show()

# %%
# ``fastervlm`` spends the whole budget around the pagoda. ``tops`` adds coverage and diversity
# terms to the same relevance; with this smooth relevance bump it keeps nearly the same patches.
# ``divprune`` ignores relevance and keeps patches whose features are far apart: textured roof and
# leaves rather than the uniform sky, whose patches are near-duplicates. ``random`` and ``pooling``
# spread the budget over the whole image.

common = np.intersect1d(kept["tops"], kept["fastervlm"])
print(f"tops and fastervlm keep {len(common)} patches in common")
for name, keep in kept.items():
    print(f"{name:>9}: mean relevance of the kept patches {relevance[0, keep].mean():.2f}")

# %%
# With a real vision tower, the features and the [CLS] or text attention come from the model:
# see :ref:`sphx_glr_auto_examples_plot_prune_a_hf_model.py`.
