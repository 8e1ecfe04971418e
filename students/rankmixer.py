"""The reference UG-Sep student: a RankMixer-style ranker with a one-way user -> candidate mask.

Data flow (B rows; every op is row-wise: nothing mixes rows of the batch)::

    user_ids, user_dense ─► embed ─► tokenize ───────────────┐  user tokens   xu [B, c_u, D]
    user_seq ─► item-table embed ─► SeqEncoder (self-attn) ─┬─► mean ─► proj ┘  (user-only)
                                                            └─► K, V (user-only, hoistable)
    item_ids, item_dense ─► embed ─► tokenize ───────────────┐  cand. tokens  xg [B, c_g, D]
                          └─► query ─► TargetAttention(K, V) ┘
    for each MixerLayer:
        xg += Linear(flatten(xu))                  information compensation (user -> cand only)
        token mixing: split each token into T = c_u + c_g head pieces and regroup;
                      user tokens receive only user pieces (candidate pieces masked to 0),
                      candidate tokens receive every piece
        x = LayerNorm(x + mix(x)); x = LayerNorm(x + per-token FFN(x))   (post-residual)
    logit = MLP([mean(xu), mean(xg)])

User and candidate tokens are kept in separate tensors throughout, so a data-flow
analysis sees every user-only tensor (the tokens, K and V, the compensation term).
Attention is written out explicitly (no fused kernels) so it exports cleanly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from students.base import Features, FieldEmbedding, Student, mlp

__all__ = ["RankMixerConfig", "RankMixerStudent", "mix_tokens"]


@dataclass(frozen=True)
class RankMixerConfig(Features):
    """Sizes of a RankMixer student (defaults: ``tiny``)."""

    emb_dim: int = 8
    d_model: int = 32
    n_user_tokens: int = 4  # c_u: c_u - 1 feature tokens + 1 sequence token
    n_cand_tokens: int = 4  # c_g: c_g - 1 feature tokens + 1 target-attention token
    n_layers: int = 2
    ffn_mult: int = 2
    seq_width: int = 16
    seq_heads: int = 2
    seq_layers: int = 1
    target_heads: int = 2

    def __post_init__(self) -> None:
        tokens = self.n_user_tokens + self.n_cand_tokens
        if self.n_user_tokens < 2 or self.n_cand_tokens < 2:
            raise ValueError(
                f"RankMixerConfig needs >= 2 user and >= 2 candidate tokens, got {self}"
            )
        if self.d_model % tokens:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by the {tokens} tokens (head pieces)"
            )
        for width, heads in ((self.seq_width, self.seq_heads), (self.seq_width, self.target_heads)):
            if width % heads:
                raise ValueError(f"seq_width={width} must be divisible by heads={heads}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over [..., heads, len, dh] tensors, written out."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, W] -> [B, heads, L, W / heads]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class SelfAttentionBlock(nn.Module):
    """Post-LN transformer block over a user's behaviour sequence."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ffn = mlp([width, 2 * width, width])
        self.ln1 = nn.LayerNorm(width)
        self.ln2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        a = attention(q, k, v).transpose(1, 2).flatten(-2)
        x = self.ln1(x + self.out(a))
        return self.ln2(x + self.ffn(x))


class SeqEncoder(nn.Module):
    """Embedded behaviour sequence [B, L, E] -> encoded sequence [B, L, W] (user-only)."""

    def __init__(self, emb_dim: int, width: int, heads: int, layers: int, seq_len: int) -> None:
        super().__init__()
        self.inp = nn.Linear(emb_dim, width)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, seq_emb: torch.Tensor) -> torch.Tensor:
        x = self.inp(seq_emb) + self.pos
        for block in self.blocks:
            x = block(x)
        return x


class TargetAttention(nn.Module):
    """The candidate attends over the user's encoded sequence; returns one candidate token.

    ``keys_values`` depends on the sequence alone (user side, computed once per request);
    ``forward`` takes its result and the candidate's query features.
    """

    def __init__(self, query_dim: int, width: int, heads: int, d_model: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(query_dim, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, d_model)

    def keys_values(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.k(seq), self.heads), split_heads(self.v(seq), self.heads)

    def forward(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.q(query).unflatten(-1, (self.heads, 1, -1))  # [B, heads, 1, dh]
        return self.out(attention(q, k, v).flatten(1))  # [B, D]


class Tokenizer(nn.Module):
    """Feature vector [B, F] -> [B, n, D]: zero-pad F to n equal chunks, one projection per chunk."""

    def __init__(self, in_dim: int, n_tokens: int, d_model: int) -> None:
        super().__init__()
        self.chunk = -(-in_dim // n_tokens)
        self.pad = self.chunk * n_tokens - in_dim
        self.n_tokens = n_tokens
        self.weight = nn.Parameter(
            torch.randn(n_tokens, self.chunk, d_model) / math.sqrt(self.chunk)
        )
        self.bias = nn.Parameter(torch.zeros(n_tokens, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.pad)).unflatten(-1, (self.n_tokens, self.chunk))
        return torch.einsum("btc,tcd->btd", x, self.weight) + self.bias


class TokenFFN(nn.Module):
    """A separate two-layer FFN per token: weights [T, D, H] and [T, H, D]."""

    def __init__(self, n_tokens: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_tokens, d_model, hidden) / math.sqrt(d_model))
        self.b1 = nn.Parameter(torch.zeros(n_tokens, hidden))
        self.w2 = nn.Parameter(torch.randn(n_tokens, hidden, d_model) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n_tokens, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(torch.einsum("btd,tdh->bth", x, self.w1) + self.b1)
        return torch.einsum("bth,thd->btd", h, self.w2) + self.b2


def mix_tokens(xu: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter-free token mixing with the one-way mask.

    Each of the T = c_u + c_g tokens is split into T head pieces of D / T; output token t
    is the concatenation of piece t of every token (user tokens first). For a user output
    token the candidate pieces are masked (zeros), so it depends on user tokens only.
    """
    cu, d = xu.shape[1], xu.shape[2]
    tokens = cu + xg.shape[1]
    # [B, src, head, piece] -> [B, head, src, piece] -> [B, head, src * piece]
    user = xu.unflatten(-1, (tokens, -1))[:, :, :cu].transpose(1, 2).flatten(-2)
    user = F.pad(user, (0, d - user.shape[-1]))
    both = torch.cat([xu, xg], dim=1).unflatten(-1, (tokens, -1))
    cand = both[:, :, cu:].transpose(1, 2).flatten(-2)
    return user, cand


class MixerLayer(nn.Module):
    """Compensation, masked token mixing and per-token FFN, each with post-residual LayerNorm."""

    def __init__(self, cu: int, cg: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.cg = cg
        self.compensate = nn.Linear(cu * d_model, cg * d_model)
        nn.init.zeros_(self.compensate.bias)
        self.user_ffn = TokenFFN(cu, d_model, hidden)
        self.cand_ffn = TokenFFN(cg, d_model, hidden)
        self.user_ln = nn.ModuleList([nn.LayerNorm(d_model), nn.LayerNorm(d_model)])
        self.cand_ln = nn.ModuleList([nn.LayerNorm(d_model), nn.LayerNorm(d_model)])

    def forward(self, xu: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xg = xg + self.compensate(xu.flatten(1)).unflatten(-1, (self.cg, -1))
        mu, mg = mix_tokens(xu, xg)
        xu = self.user_ln[0](xu + mu)
        xg = self.cand_ln[0](xg + mg)
        xu = self.user_ln[1](xu + self.user_ffn(xu))
        xg = self.cand_ln[1](xg + self.cand_ffn(xg))
        return xu, xg


class TokenFrontStudent(Student):
    """The UG-Sep token front every token student shares (RankMixer, TokenMixer): field
    embeddings, user and candidate tokenizers, the behaviour-sequence encoder and the
    target attention; subclasses add their mixer layers and head after ``_build_front``."""

    def _build_front(self, c) -> None:
        d, e = c.d_model, c.emb_dim
        self.user_emb = FieldEmbedding(c.n_user_fields, c.vocab, e)
        self.item_emb = FieldEmbedding(c.n_item_fields, c.vocab, e)
        user_dim = c.n_user_fields * e + c.n_user_dense
        item_dim = c.n_item_fields * e + c.n_item_dense
        self.user_tokens = Tokenizer(user_dim, c.n_user_tokens - 1, d)
        self.seq_encoder = SeqEncoder(e, c.seq_width, c.seq_heads, c.seq_layers, c.seq_len)
        self.seq_token = nn.Linear(c.seq_width, d)
        self.cand_tokens = Tokenizer(item_dim, c.n_cand_tokens - 1, d)
        self.target = TargetAttention(item_dim, c.seq_width, c.target_heads, d)

    def user_side(self, user_ids, user_dense, user_seq):
        """User tokens [B, c_u, D] and target-attention keys/values: user inputs only."""
        feats = torch.cat([self.user_emb(user_ids).flatten(1), user_dense], dim=-1)
        seq = self.seq_encoder(self.item_emb.table(user_seq))  # field-0 (item id) table
        seq_tok = self.seq_token(seq.mean(dim=1)).unsqueeze(1)
        xu = torch.cat([self.user_tokens(feats), seq_tok], dim=1)
        k, v = self.target.keys_values(seq)
        return xu, k, v

    def candidate_tokens(self, item_ids, item_dense, k, v):
        """Candidate tokens [B, c_g, D]: item features plus the target-attention token."""
        feats = torch.cat([self.item_emb(item_ids).flatten(1), item_dense], dim=-1)
        ta = self.target(feats, k, v).unsqueeze(1)
        return torch.cat([self.cand_tokens(feats), ta], dim=1)



class RankMixerStudent(TokenFrontStudent):
    """RankMixer-style UG-Sep ranker; see the module docstring for the data flow."""

    def __init__(self, config: RankMixerConfig) -> None:
        super().__init__(config)
        c = config
        self._build_front(c)
        hidden = c.ffn_mult * c.d_model
        self.layers = nn.ModuleList(
            MixerLayer(c.n_user_tokens, c.n_cand_tokens, c.d_model, hidden) for _ in range(c.n_layers)
        )
        self.head = mlp([2 * c.d_model, c.d_model, 1])

    def logits(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Pre-sigmoid click score [B]."""
        xu, k, v = self.user_side(user_ids, user_dense, user_seq)
        xg = self.candidate_tokens(item_ids, item_dense, k, v)
        for layer in self.layers:
            xu, xg = layer(xu, xg)
        pooled = torch.cat([xu.mean(dim=1), xg.mean(dim=1)], dim=-1)
        return self.head(pooled).squeeze(-1)

    def forward(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Click probability ``ctr`` [B]."""
        return torch.sigmoid(self.logits(user_ids, user_dense, user_seq, item_ids, item_dense))
