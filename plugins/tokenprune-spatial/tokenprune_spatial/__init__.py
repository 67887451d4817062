"""tokenprune-spatial: a sample tokenprune plugin with one criterion, spatial coverage of the patch grid.

The package registers nothing at import. Its ``pyproject.toml`` declares the entry point

.. code-block:: toml

    [project.entry-points."tokenprune.criteria"]
    spatial_coverage = "tokenprune_spatial:SpatialCoverage"

and tokenprune registers :class:`SpatialCoverage` under that name, with this distribution as its
source, the first time its criterion registry is read.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import lru_cache

import networkx as nx
import torch

from tokenprune.criteria import Criterion, Tags
from tokenprune.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["SpatialCoverage", "coverage_matrix"]

WEIGHTS = ("uniform", "relevance")
CONNECTIVITIES = (4, 8)


@lru_cache(maxsize=32)
def _coverage_matrix_cpu(rows: int, cols: int, radius: int, connectivity: int) -> torch.Tensor:
    graph = nx.grid_2d_graph(rows, cols)
    if connectivity == 8:
        graph.add_edges_from(((r, c), (r + 1, c + dc)) for r in range(rows - 1) for c in range(cols)
                             for dc in (-1, 1) if 0 <= c + dc < cols)
    cover = torch.zeros(rows * cols, rows * cols, dtype=torch.bool)
    for (r, c), near in nx.all_pairs_shortest_path_length(graph, cutoff=radius):
        i = r * cols + c
        cover[i, [rr * cols + cc for rr, cc in near]] = True
    cover.requires_grad_(False)
    return cover


def coverage_matrix(rows: int, cols: int, radius: int, connectivity: int = 4) -> torch.Tensor:
    """bool ``[N, N]`` with ``N = rows * cols``: which grid cells each cell covers.

    Entry ``[i, j]`` is ``True`` when the graph distance between cells ``i`` and ``j`` (raster order)
    on the grid graph is at most ``radius``. With ``connectivity=4`` the grid graph links horizontal
    and vertical neighbours (the distance is the Manhattan distance); with ``8`` it also links
    diagonal neighbours (the Chebyshev distance). The matrix is symmetric and cached per argument
    tuple; do not modify it.

    Parameters
    ----------
    rows, cols : int
        The patch grid, ``rows * cols`` visual tokens in raster order.
    radius : int
        Coverage radius in grid steps, ``>= 0`` (0: a token covers only its own cell).
    connectivity : {4, 8}
        Grid neighbourhood.

    Returns
    -------
    torch.Tensor
        bool ``[N, N]`` on the CPU.

    Notes
    -----
    Built once per argument tuple with networkx breadth-first searches cut off at ``radius``:
    ``O(N r²)`` time; ``O(N²)`` bits of memory for the dense matrix.
    """
    return _coverage_matrix_cpu(int(rows), int(cols), int(radius), int(connectivity))


@dataclass(frozen=True, kw_only=True)
class SpatialCoverage(Criterion):
    """Spatial coverage of the patch grid: the weight of grid cells near a kept visual token.

    With ``d(i, j)`` the shortest-path distance between cells ``i`` and ``j`` on the grid graph of the
    patches and ``w_j >= 0`` a weight per cell,

    .. math:: f(S) = \\sum_{j \\in V} w_j \\, \\big[\\exists s \\in S : d(s, j) \\le r\\big], \\qquad
              \\Delta(i \\mid S) = \\sum_{j \\in V} w_j \\, [d(i, j) \\le r] \\, [j \\text{ not yet covered}]

    A weighted coverage function: greedy selection under a budget spreads the kept tokens over the
    image (a spatial-uniformity prior, which the literature finds strong), and mixing it with
    relevance (``0.7 * Relevance() + 0.3 * SpatialCoverage()``) keeps that prior in a text-guided
    method.

    Parameters
    ----------
    radius : int
        Coverage radius ``r`` in grid steps, ``>= 0`` (default 1). ``0`` makes ``f`` modular: each
        token covers only its own cell.
    connectivity : {4, 8}
        Grid graph neighbourhood: 4 (Manhattan distance, default) or 8 (Chebyshev distance).
    weight : {"uniform", "relevance"}
        Cell weights ``w_j``: 1 for every valid cell (default), or ``ctx.relevance`` clamped at 0
        (negative relevance counts as 0, which keeps ``f`` monotone).

    Raises
    ------
    ConfigError
        At construction: a negative or non-integer ``radius``, or an unknown ``connectivity`` or
        ``weight``.
    MissingSignalError
        At selection: the context has no ``grid`` (pass ``grid=(rows, cols)``), or no ``relevance``
        with ``weight="relevance"``.

    Notes
    -----
    Tags: monotone, submodular, exact gains; requires ``grid`` (and ``relevance`` when
    ``weight="relevance"``). Greedy is therefore a ``(1 - 1/e)`` approximation and lazy greedy is exact.
    Padding tokens are never covered targets; graph distances are taken on the full grid.

    Cost: the cover matrix is built once per grid, radius and connectivity (see
    :func:`coverage_matrix`); each gains call is one ``[B, N] x [N, N]`` product, ``O(B N²)``, and
    each update ``O(B N)``.

    Choices: this plugin is an illustration of the plugin interface, not a method from a paper; the
    closest published idea is the spatial-uniformity argument for pooling and random baselines in
    "Token Pruning in MLLMs: Are We Solving the Right Problem?" (arXiv:2502.11501).

    References
    ----------
    .. [1] Nemhauser, Wolsey and Fisher, "An analysis of approximations for maximizing submodular set
       functions", Mathematical Programming 14, 1978 (coverage functions, greedy bound).
    .. [2] arXiv:2502.11501 (spatial uniformity as a pruning baseline).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune_spatial import SpatialCoverage
    >>> m = tp.compose(SpatialCoverage(radius=1), selector="greedy", budget=2)
    >>> m.select(torch.randn(1, 9, 4), grid=(3, 3)).indices.tolist()
    [[1, 4]]
    """

    radius: int = 1
    connectivity: int = 4
    weight: str = "uniform"

    def __post_init__(self):
        if isinstance(self.radius, bool) or not isinstance(self.radius, numbers.Integral) or self.radius < 0:
            raise ConfigError(f"SpatialCoverage radius must be an int >= 0 (grid steps), got {self.radius!r}")
        if isinstance(self.connectivity, bool) or self.connectivity not in CONNECTIVITIES:
            raise ConfigError(f"SpatialCoverage connectivity must be 4 or 8, got {self.connectivity!r}")
        if self.weight not in WEIGHTS:
            raise ConfigError(f"SpatialCoverage weight must be one of {WEIGHTS}, got {self.weight!r}")

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        """Monotone and submodular; requires ``grid`` (and ``relevance`` for ``weight="relevance"``)."""
        req = {"grid", "relevance"} if self.weight == "relevance" else {"grid"}
        return Tags(modular=self.radius == 0, monotone=True, submodular=True, requires=frozenset(req))

    # -- helpers -------------------------------------------------------------------------------------
    def _cover(self, ctx) -> torch.Tensor:
        rows, cols = ctx.grid
        return coverage_matrix(rows, cols, self.radius, self.connectivity).to(ctx.device, torch.float32)

    def _weights(self, ctx) -> torch.Tensor:
        if self.weight == "relevance":
            w = ctx.relevance.float().clamp_min(0.0)
        else:
            w = torch.ones(ctx.mask.shape, device=ctx.device)
        return w * ctx.mask

    # -- criterion contract --------------------------------------------------------------------------
    def prepare(self, ctx):
        """State for ``S = {}``: the cover matrix, the cell weights and an all-false covered mask."""
        self.check(ctx)
        return {"cover": self._cover(ctx), "w": self._weights(ctx),
                "covered": torch.zeros(ctx.mask.shape, dtype=torch.bool, device=ctx.device)}

    def gains(self, ctx, state, candidates):
        """float32 ``[B, N]``: the weight of the cells each token would newly cover."""
        uncovered = state["w"].masked_fill(state["covered"], 0.0)
        return uncovered @ state["cover"]  # cover is symmetric

    def update(self, ctx, state, picked, active):
        """Mark the cells within ``radius`` of ``picked`` (long ``[B]``) as covered in active rows."""
        newly = state["cover"][picked].bool() & active[:, None]
        return {**state, "covered": state["covered"] | newly}

    def evaluate(self, ctx, subset):
        """float32 ``[B]``: ``f(S)`` from scratch for ``subset`` (bool ``[B, N]``)."""
        self.check(ctx)
        s = (subset & ctx.mask).float()
        covered = (s @ self._cover(ctx)) > 0
        return (self._weights(ctx) * covered).sum(1)
