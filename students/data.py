"""Synthetic CTR data from a known click model.

A :class:`World` holds persistent users and items. Both have a latent vector drawn
from a two-level hierarchy of clusters (user segments / item categories, each with
sub-clusters); their id fields expose that hierarchy (own id, cluster, sub-cluster,
then quantised latent coordinates), so ids carry signal but none gives it all away.
Each user has a behaviour sequence of item ids drawn from its preferences.

The true click logit of a (user, item) pair is a sum of standardised terms::

    logit = bias + 1.0 * z_u' W v_i                      latent user x item interest
                 + 0.8 * frac(seq items in item's sub-category)   sequence x candidate
                 + 0.3 * popularity_i + 0.3 * user_dense_0 * item_dense_1

and a click is Bernoulli(sigmoid(logit)). Every term but popularity is a user x item
cross, so a model must learn crosses to approach the Bayes-optimal AUC.

Rows are dicts of numpy arrays keyed by the students' input names (``user_ids``
[B, F_u] int64, ``user_dense`` [B, D_u] float32, ``user_seq`` [B, L] int64, ``item_ids``
[B, F_i] int64, ``item_dense`` [B, D_i] float32) plus ``label`` (0/1 float32) and
``prob`` (true probability, float32); held-out rows also carry ``request_id`` (int64;
one user and its candidates per request). Ids lie in [1, vocab); 0 is never drawn.
``user_seq`` holds item ids in the vocabulary of ``item_ids`` field 0.

The ``.npz`` layout of :func:`save_npz` is one array per input name (the names a
model's spec uses, e.g. ``user.ids`` for the two-tower student), batch first, plus
the optional ``label``, ``prob`` and ``request_id``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataConfig",
    "DATA_CONFIGS",
    "INPUT_NAMES",
    "World",
    "make_dataset",
    "save_npz",
    "load_npz",
    "rename",
    "take",
]

INPUT_NAMES = ("user_ids", "user_dense", "user_seq", "item_ids", "item_dense")
EXTRA_NAMES = ("label", "prob", "request_id")
_QUANT_BINS = 8


@dataclass(frozen=True)
class DataConfig:
    """Sizes of the synthetic world and of the feature tensors."""

    n_user_fields: int = 4
    n_user_dense: int = 2
    seq_len: int = 8
    n_item_fields: int = 3
    n_item_dense: int = 2
    vocab: int = 1000
    n_users: int = 900  # < vocab: every user has its own id
    n_items: int = 600
    latent_dim: int = 8
    n_clusters: int = 6  # top-level user segments / item categories
    n_subclusters: int = 4  # sub-clusters per cluster

    def to_dict(self) -> dict:
        return asdict(self)


DATA_CONFIGS = {
    "tiny": DataConfig(),
    "bench": DataConfig(
        n_user_fields=12,
        n_user_dense=4,
        seq_len=64,
        n_item_fields=6,
        n_item_dense=2,
        vocab=50_000,
        n_users=10_000,
        n_items=2_000,
        latent_dim=16,
        n_clusters=10,
        n_subclusters=6,
    ),
}


def _hierarchy(rng: np.random.Generator, n: int, cfg: DataConfig):
    """Latent vectors from cluster centre + sub-cluster offset + individual noise."""
    k, c, s = cfg.latent_dim, cfg.n_clusters, cfg.n_subclusters
    centres = rng.standard_normal((c, k))
    offsets = 0.6 * rng.standard_normal((c, s, k))
    top = rng.integers(0, c, n)
    sub = rng.integers(0, s, n)
    z = centres[top] + offsets[top, sub] + 0.4 * rng.standard_normal((n, k))
    return z / np.sqrt(k), top, top * s + sub


def _id_fields(rng, z, top, sub, n_fields: int, vocab: int) -> np.ndarray:
    """[n, n_fields] ids: own id, cluster, sub-cluster, then quantised latent coordinates."""
    n = len(z)
    raw = [np.arange(n), top, sub]
    for j in range(max(0, n_fields - 3)):
        coord = z[:, j % z.shape[1]]
        edges = np.quantile(coord, np.linspace(0, 1, _QUANT_BINS + 1)[1:-1])
        raw.append(np.searchsorted(edges, coord) + _QUANT_BINS * (j // z.shape[1]))
    cols = []
    for j in range(n_fields):
        perm = rng.permutation(vocab - 1)  # a field's values scattered over [1, vocab)
        cols.append(perm[raw[j] % (vocab - 1)] + 1)
    return np.stack(cols, 1).astype(np.int64)


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-9)


class World:
    """Persistent users and items and the true click model over their pairs."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        if cfg.n_user_fields < 1 or cfg.n_item_fields < 1 or cfg.seq_len < 1 or cfg.vocab < 2:
            raise ValueError(
                f"DataConfig needs >= 1 id field per side, seq_len >= 1, vocab >= 2: {cfg}"
            )
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        k = cfg.latent_dim
        self.user_z, u_top, u_sub = _hierarchy(rng, cfg.n_users, cfg)
        self.item_v, i_top, self.item_sub = _hierarchy(rng, cfg.n_items, cfg)
        self.user_ids = _id_fields(rng, self.user_z, u_top, u_sub, cfg.n_user_fields, cfg.vocab)
        self.item_ids = _id_fields(
            rng, self.item_v, i_top, self.item_sub, cfg.n_item_fields, cfg.vocab
        )
        self.cross = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
        self.item_pop = rng.standard_normal(cfg.n_items)
        u_dense = self.user_z @ rng.standard_normal(
            (k, cfg.n_user_dense)
        ) + 0.5 * rng.standard_normal((cfg.n_users, cfg.n_user_dense))
        self.user_dense = _standardise(u_dense).astype(np.float32)
        i_dense = self.item_v @ rng.standard_normal(
            (k, cfg.n_item_dense)
        ) + 0.5 * rng.standard_normal((cfg.n_items, cfg.n_item_dense))
        i_dense[:, 0] = self.item_pop
        self.item_dense = _standardise(i_dense).astype(np.float32)
        self.seq_items = self._sample_sequences(rng)
        n_sub = cfg.n_clusters * cfg.n_subclusters
        rows = np.repeat(np.arange(cfg.n_users), cfg.seq_len)
        hist = np.zeros((cfg.n_users, n_sub))
        np.add.at(hist, (rows, self.item_sub[self.seq_items].ravel()), 1.0 / cfg.seq_len)
        self.seq_sub_frac = hist
        self._scale = self._term_scales(rng)

    def _sample_sequences(self, rng: np.random.Generator, chunk: int = 2048) -> np.ndarray:
        """[n_users, L] item indices drawn from softmax(3 * interest) by inverse CDF."""
        cfg = self.cfg
        out = np.empty((cfg.n_users, cfg.seq_len), dtype=np.int64)
        for lo in range(0, cfg.n_users, chunk):  # chunks bound memory at chunk x n_items
            z = self.user_z[lo : lo + chunk]
            logits = 3.0 * (z @ self.cross) @ self.item_v.T
            p = np.exp(logits - logits.max(1, keepdims=True))
            cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)
            cdf[:, -1] = 1.0
            offs = np.arange(len(z))[:, None]
            u = rng.random((len(z), cfg.seq_len)) * (1 - 1e-9)
            flat = np.searchsorted((cdf + offs).ravel(), (u + offs).ravel(), side="right")
            out[lo : lo + chunk] = flat.reshape(len(z), cfg.seq_len) - offs * cfg.n_items
        return out.clip(0, cfg.n_items - 1)

    def _terms(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """[4, n] raw logit terms: interest, sequence affinity, popularity, dense cross."""
        interest = np.einsum("nk,nk->n", self.user_z[u] @ self.cross, self.item_v[i])
        seq_aff = self.seq_sub_frac[u, self.item_sub[i]]
        dense = self.user_dense[u, 0] * self.item_dense[i, -1]
        return np.stack([interest, seq_aff, self.item_pop[i], dense])

    def _term_scales(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of each term over random pairs, so the weights mean what they say."""
        t = self._terms(
            rng.integers(0, self.cfg.n_users, 20_000), rng.integers(0, self.cfg.n_items, 20_000)
        )
        return t.mean(1, keepdims=True), t.std(1, keepdims=True) + 1e-9

    def logit(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """True click logit of users ``u`` for items ``i`` (index arrays of equal length)."""
        mean, std = self._scale
        weights = np.array([1.0, 0.8, 0.3, 0.3])[:, None]
        return -1.4 + np.sum(weights * (self._terms(u, i) - mean) / std, 0)

    def rows(self, u: np.ndarray, i: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Feature rows for pairs (u, i) with labels drawn from the true probabilities."""
        prob = 1.0 / (1.0 + np.exp(-self.logit(u, i)))
        return {
            "user_ids": self.user_ids[u],
            "user_dense": self.user_dense[u],
            "user_seq": self.item_ids[self.seq_items[u], 0],
            "item_ids": self.item_ids[i],
            "item_dense": self.item_dense[i],
            "label": (rng.random(len(u)) < prob).astype(np.float32),
            "prob": prob.astype(np.float32),
        }

    def _exposure(self) -> np.ndarray:
        w = np.exp(0.5 * self.item_pop)
        return w / w.sum()

    def sample(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``n`` independent impressions (random user, popularity-weighted item)."""
        rng = np.random.default_rng(seed)
        u = rng.integers(0, self.cfg.n_users, n)
        i = rng.choice(self.cfg.n_items, n, p=self._exposure())
        return self.rows(u, i, rng)

    def requests(self, n_requests: int, candidates: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``n_requests`` requests of one user and ``candidates`` items each, with ``request_id``."""
        rng = np.random.default_rng(seed)
        users = rng.integers(0, self.cfg.n_users, n_requests)
        request_id = np.repeat(np.arange(n_requests, dtype=np.int64), candidates)
        i = rng.choice(self.cfg.n_items, n_requests * candidates, p=self._exposure())
        rows = self.rows(users[request_id], i, rng)
        rows["request_id"] = request_id
        return rows


def make_dataset(
    config: str | DataConfig = "tiny",
    n_train: int = 100_000,
    n_requests: int = 400,
    candidates: int = 50,
    seed: int = 0,
) -> tuple[World, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A world and its train rows and held-out requests (independent random streams)."""
    cfg = DATA_CONFIGS[config] if isinstance(config, str) else config
    world_seed, train_seed, held_seed = np.random.SeedSequence(seed).generate_state(3)
    world = World(cfg, int(world_seed))
    return (
        world,
        world.sample(n_train, int(train_seed)),
        world.requests(n_requests, candidates, int(held_seed)),
    )


def take(rows: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    """The same rows of every array."""
    return {k: v[index] for k, v in rows.items()}


def rename(rows: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, np.ndarray]:
    """Rename input arrays (e.g. ``user_ids`` -> ``user.ids``); other keys pass through."""
    return {names.get(k, k): v for k, v in rows.items()}


def save_npz(path: str | Path, rows: dict[str, np.ndarray]) -> Path:
    """Write rows as an uncompressed ``.npz`` (arrays by name, batch first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in rows.items()})
    return path


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read rows written by :func:`save_npz` (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
