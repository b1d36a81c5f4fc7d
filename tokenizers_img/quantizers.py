"""Quantizers: vector (VQ-VAE / LlamaGen), multi-scale residual (VAR / TokenFlow) and binary (ELM BAE).

Each is a plain ``nn.Module`` that computes in fp32 even under autocast and returns a
:class:`~tokenizers_img.base.QuantizerOutput` ``(quantized, indices, loss, stats)``.

References
----------
* VQ-VAE, van den Oord et al. 2017 (arXiv 1711.00937): z_q = e_{argmin_k ||z - e_k||},
  straight-through z_q <- z + sg(z_q - z), L = ||sg z - z_q||^2 + beta ||z - sg z_q||^2, beta = 0.25;
  EMA codebook (their Appendix A.1): N_k <- g N_k + (1-g) n_k, m_k <- g m_k + (1-g) sum z, e_k = m_k / N_k.
* LlamaGen (arXiv 2406.06525, ``tokenizer/tokenizer_image/vq_model.py``): l2-normalised z and codes,
  d = ||z||^2 + ||e||^2 - 2 z.e, codebook init U(-1/K, 1/K).
* taming-transformers "legacy" loss (used by SEED): beta multiplies the *codebook* term instead
  (``legacy_beta=True``).
* VAR (arXiv 2404.02905) / TokenFlow (arXiv 2412.03069): multi-scale residual quantization,
  r~_k = area(r_{k-1}, s_k), Q_k = bicubic(VQ(r~_k), h), f^ += Q_k, r_k = r_{k-1} - sg Q_k,
  per-scale losses averaged, random drop of one scale (not the first) with p = 0.1 in training.
* ELM (arXiv 2410.16257, ``bae/binaryae.py``): p = sigmoid(logits), b = 1[p > 0.5] or Bernoulli(p),
  straight-through b_st = b + p - sg p, bit-confidence loss mean(p (1 - p)); bits are packed into
  ``token_each`` sub-tokens of ``code_dim`` bits, most significant bit first.

Layout convention: latents are channel-first, (B, D, *spatial) -- e.g. (B, D, h, w) maps or (B, D, L)
sequences; ``VectorQuantizer`` indices then have shape (B, *spatial).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_img.base import QuantizerOutput

__all__ = [
    "VectorQuantizer",
    "MultiScaleResidualQuantizer",
    "BinaryQuantizer",
    "bits_to_subtokens",
    "subtokens_to_bits",
    "subtoken_bit_table",
    "nearest_code_ref",
    "codebook_stats",
]

# (z (N, D), codebook (K, D)) -> indices (N,)
LookupFn = Callable[[Tensor, Tensor], Tensor]
# x (..., D) -> normalised x (..., D)
NormalizeFn = Callable[[Tensor], Tensor]


def _fp32_off_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def nearest_code_ref(z: Tensor, codebook: Tensor) -> Tensor:
    """Reference nearest-code search by explicit pairwise distances (slow, tiny sizes only).

    z (N, D), codebook (K, D) -> indices (N,) = argmin_k ||z - e_k||_2.
    """
    d = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (N, K)
    return d.argmin(dim=1)


def nearest_code(z: Tensor, codebook: Tensor, chunk: int = 8192) -> Tensor:
    """Fast nearest-code search: d = ||z||^2 + ||e||^2 - 2 z.e, argmin over k (chunked over N).

    z (N, D), codebook (K, D) -> indices (N,). Equal to :func:`nearest_code_ref` up to fp ties.
    """
    e2 = (codebook**2).sum(1)  # (K,)
    out = []
    for zc in z.split(chunk):
        d = (zc**2).sum(1, keepdim=True) + e2[None] - 2 * zc @ codebook.t()  # (n, K)
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else z.new_zeros(0, dtype=torch.long)


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """usage = fraction of codes hit by ``indices``; perplexity = exp(entropy of the code histogram)."""
    idx = indices[indices >= 0].reshape(-1)
    counts = torch.bincount(idx, minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def _l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=-1, eps=1e-6)


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with straight-through gradients.

    Args:
        codebook_size: K codes.
        dim: D, the code (and latent channel) dimension.
        beta: commitment weight (0.25 in VQ-VAE, LlamaGen, TokenFlow).
        l2_norm: l2-normalise z and the codes before the search (LlamaGen / "cosine" codes); the
            quantized output is then the unit-norm code and the STE uses the normalised z.
        legacy_beta: taming "legacy" loss (SEED): beta on the codebook term, 1.0 on commitment.
        use_ema: update the codebook by exponential moving averages instead of the codebook loss.
        ema_decay: gamma of the EMA update.
        restart_dead: replace codes unused for ``dead_after`` training forwards by random encoder
            outputs of the current batch (Dhariwal et al. 2020 "Jukebox" style restart).
        dead_after: number of training forwards without a hit after which a code counts as dead.
        lookup_fn: optional ``(z (N, D), codebook (K, D)) -> indices (N,)`` replacing the argmin of
            the euclidean distance (TokenFlow's shared two-codebook distance plugs in here); it
            receives the *normalised* z and codebook when ``l2_norm`` is on.
        normalize_fn: optional replacement of the per-vector l2 normalisation (e.g. per-half).

    Input z: (B, D, *spatial). Output quantized: same shape, indices: (B, *spatial).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        l2_norm: bool = False,
        legacy_beta: bool = False,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        restart_dead: bool = False,
        dead_after: int = 100,
        lookup_fn: LookupFn | None = None,
        normalize_fn: NormalizeFn | None = None,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.l2_norm, self.legacy_beta = l2_norm, legacy_beta
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.restart_dead, self.dead_after = restart_dead, dead_after
        self.lookup_fn, self.normalize_fn = lookup_fn, normalize_fn
        self.embedding = nn.Embedding(codebook_size, dim)
        # LlamaGen / taming: U(-1/K, 1/K), then l2-normalised when l2_norm.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(self._normalize(self.embedding.weight))
        if use_ema:
            self.embedding.weight.requires_grad_(False)
            # N_k = 1 and m_k = e_k at the start, so an unused code decays in both and stays put.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # training forwards since each code was last selected (for dead-code restart)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        # restarts chosen in one forward are applied at the start of the next one: changing the codebook in
        # place before backward() would invalidate the autograd graph that used it
        self._pending_restart: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    def _normalize(self, x: Tensor) -> Tensor:
        return self.normalize_fn(x) if self.normalize_fn is not None else _l2norm(x)

    def get_codebook(self) -> Tensor:
        """(K, D) codes exactly as the decoder sees them (normalised when ``l2_norm``)."""
        w = self.embedding.weight.float()
        return self._normalize(w) if self.l2_norm else w

    def lookup(self, z_flat: Tensor, codebook: Tensor) -> Tensor:
        """z (N, D), codebook (K, D) -> nearest indices (N,). Override or pass ``lookup_fn``."""
        if self.lookup_fn is not None:
            return self.lookup_fn(z_flat, codebook)
        return nearest_code(z_flat, codebook)

    def embed(self, indices: Tensor) -> Tensor:
        """indices (B, *spatial) -> quantized latents (B, D, *spatial) (no STE)."""
        z_q = F.embedding(indices, self.get_codebook())  # (B, *spatial, D)
        return z_q.movedim(-1, 1)

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, ...) latents, got {tuple(z.shape)}")
        in_dtype = z.dtype
        self.apply_pending_restart()
        with _fp32_off_autocast(z.device.type):
            z = z.float()
            z_last = z.movedim(1, -1)  # (B, *spatial, D)
            if self.l2_norm:
                z_last = self._normalize(z_last)
            flat = z_last.reshape(-1, self.dim)  # (N, D)
            codebook = self.get_codebook()  # (K, D)
            with torch.no_grad():
                idx = self.lookup(flat.detach(), codebook.detach())  # (N,)
            z_q = F.embedding(idx, codebook)  # (N, D)

            if self.training and self.use_ema:
                self._ema_update(flat.detach(), idx)
                z_q = F.embedding(idx, self.get_codebook())
            if self.use_ema:
                codebook_term = z_q.new_zeros(())
            else:
                codebook_term = F.mse_loss(z_q, flat.detach())
            commit_term = F.mse_loss(flat, z_q.detach())
            if self.legacy_beta:
                loss = commit_term + self.beta * codebook_term
            else:
                loss = codebook_term + self.beta * commit_term

            if self.training and self.restart_dead:
                self._restart_dead_codes(flat.detach(), idx)

            z_q = z_q.view_as(z_last)
            z_q = z_last + (z_q - z_last).detach()  # straight-through estimator
            quantized = z_q.movedim(-1, 1).to(in_dtype)  # (B, D, *spatial)
            indices = idx.view(z_last.shape[:-1])  # (B, *spatial)
            stats = {k: v.detach() for k, v in codebook_stats(idx, self.codebook_size).items()}
            stats["codebook_loss"] = codebook_term.detach()
            stats["commit_loss"] = commit_term.detach()
        return QuantizerOutput(quantized, indices, loss, stats)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor) -> None:
        onehot_counts = torch.bincount(idx, minlength=self.codebook_size).float()  # (K,)
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)  # (K, D)
        _all_reduce_sum(onehot_counts)
        _all_reduce_sum(embed_sum)
        g = self.ema_decay
        self.ema_cluster_size.mul_(g).add_(onehot_counts, alpha=1 - g)
        self.ema_embed_sum.mul_(g).add_(embed_sum, alpha=1 - g)
        n = self.ema_cluster_size.sum()
        # Laplace smoothing keeps e_k finite for codes with N_k ~ 0 (VQ-VAE-2 / sonnet).
        size = (self.ema_cluster_size + 1e-5) / (n + self.codebook_size * 1e-5) * n
        new = self.ema_embed_sum / size[:, None]
        self.embedding.weight.copy_(self._normalize(new) if self.l2_norm else new)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, idx: Tensor) -> None:
        hit = torch.bincount(idx, minlength=self.codebook_size)
        _all_reduce_sum(hit)
        self.steps_unused.add_(1).masked_fill_(hit > 0, 0)
        dead = (self.steps_unused >= self.dead_after).nonzero().squeeze(1)
        if dead.numel() == 0 or flat.shape[0] == 0:
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        new = flat[pick]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(new, src=0)  # every rank restarts to the same vectors
        new = self._normalize(new) if self.l2_norm else new
        self._pending_restart = (dead, new.clone())
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def apply_pending_restart(self) -> int:
        """Move the codes marked dead in the previous training forward onto the chosen encoder outputs.

        Called at the start of ``forward`` (and usable after the last step). Returns the number restarted.
        """
        if self._pending_restart is None:
            return 0
        dead, new = self._pending_restart
        self._pending_restart = None
        self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
        if self.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new
        return int(dead.numel())


def _as_hw(s: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(s, int):
        return (s, s)
    s = tuple(int(v) for v in s)
    if len(s) != 2:
        raise ValueError(f"a scale must be an int or (h, w), got {s}")
    return s  # type: ignore[return-value]


class MultiScaleResidualQuantizer(nn.Module):
    """VAR-style multi-scale residual quantizer (as in TokenFlow, without VAR's phi convs).

    For scales s_1 < ... < s_K = (h, w), with residual r_0 = z and f^ = 0::

        r~_k = area_interp(r_{k-1}, s_k);  q_k = VQ_k(r~_k);  Q_k = bicubic(q_k, (h, w))
        f^ += Q_k;  r_k = r_{k-1} - sg(Q_k)

    Args:
        codebook_size, dim, beta, l2_norm, lookup_fn, normalize_fn, ...: passed to each
            :class:`VectorQuantizer` (``vq_kwargs`` for the rest).
        scales: side (or (h, w)) of every scale, increasing; the last equals the latent grid.
        shared_codebook: one codebook for all scales (TokenFlow, VAR) or one per scale.
        scale_drop_prob: in ``train()`` only, probability of skipping one random scale (never the
            first); its indices are filled with -1 and it adds nothing to f^.

    Input z: (B, D, h, w). Output: quantized f^ (B, D, h, w) (straight-through per scale),
    indices (B, sum_k s_k,h * s_k,w) scale by scale, raster order within a scale; loss averaged over
    the scales used.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        scales: Sequence[int | Sequence[int]] = (1, 2, 4, 6, 8),
        shared_codebook: bool = True,
        beta: float = 0.25,
        l2_norm: bool = True,
        scale_drop_prob: float = 0.0,
        lookup_fn: LookupFn | None = None,
        normalize_fn: NormalizeFn | None = None,
        **vq_kwargs,
    ) -> None:
        super().__init__()
        self.scales = [_as_hw(s) for s in scales]
        if not self.scales:
            raise ValueError("scales must not be empty")
        self.codebook_size, self.dim = codebook_size, dim
        self.shared_codebook, self.scale_drop_prob = shared_codebook, scale_drop_prob
        n_books = 1 if shared_codebook else len(self.scales)
        self.quantizers = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, beta=beta, l2_norm=l2_norm, lookup_fn=lookup_fn,
                            normalize_fn=normalize_fn, **vq_kwargs)
            for _ in range(n_books)
        )

    @property
    def tokens_per_scale(self) -> list[int]:
        return [h * w for h, w in self.scales]

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_scale)

    def quantizer_for(self, k: int) -> VectorQuantizer:
        return self.quantizers[0 if self.shared_codebook else k]

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"MultiScaleResidualQuantizer expects (B, {self.dim}, h, w), got {tuple(z.shape)}")
        H, W = z.shape[-2:]
        if self.scales[-1] != (H, W):
            raise ValueError(f"last scale {self.scales[-1]} must equal the latent grid {(H, W)}")
        in_dtype = z.dtype
        drop = -1
        if self.training and len(self.scales) > 1 and self.scale_drop_prob > 0:
            if torch.rand(()) < self.scale_drop_prob:
                drop = int(torch.randint(1, len(self.scales), ()))
        with _fp32_off_autocast(z.device.type):
            z = z.float()
            residual = z
            f_hat = torch.zeros_like(z)
            losses, all_idx, used_idx = [], [], []
            for k, (h, w) in enumerate(self.scales):
                if k == drop:
                    all_idx.append(z.new_full((z.shape[0], h * w), -1, dtype=torch.long))
                    continue
                r_k = F.interpolate(residual, size=(h, w), mode="area") if (h, w) != (H, W) else residual
                q = self.quantizer_for(k)(r_k)
                q_up = q.quantized if (h, w) == (H, W) else F.interpolate(
                    q.quantized, size=(H, W), mode="bicubic", align_corners=False)
                f_hat = f_hat + q_up
                residual = residual - q_up.detach()
                losses.append(q.loss)
                all_idx.append(q.indices.reshape(z.shape[0], -1))  # (B, h*w)
                used_idx.append(q.indices.reshape(-1))
            loss = torch.stack(losses).mean()
            indices = torch.cat(all_idx, dim=1)  # (B, sum h*w)
            stats = {k: v.detach() for k, v in codebook_stats(torch.cat(used_idx), self.codebook_size).items()}
        return QuantizerOutput(f_hat.to(in_dtype), indices, loss, stats)

    def split_indices(self, indices: Tensor) -> list[Tensor]:
        """(B, sum s^2) -> per-scale (B, h_k, w_k) index maps."""
        if indices.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} indices per image, got {indices.shape[-1]}")
        parts = indices.split(self.tokens_per_scale, dim=-1)
        return [p.reshape(indices.shape[0], h, w) for p, (h, w) in zip(parts, self.scales)]

    def embed(self, indices: Tensor) -> Tensor:
        """indices (B, sum s^2) -> f^ (B, D, h, w): look up every scale, bicubic-upsample, sum.

        Equals ``forward(z).quantized`` in eval mode (scales with index -1 are skipped).
        """
        H, W = self.scales[-1]
        f_hat = None
        for k, (idx, (h, w)) in enumerate(zip(self.split_indices(indices), self.scales)):
            if bool((idx < 0).all()):
                continue
            q = self.quantizer_for(k).embed(idx.clamp_min(0))  # (B, D, h, w)
            q = q if (h, w) == (H, W) else F.interpolate(q, size=(H, W), mode="bicubic", align_corners=False)
            f_hat = q if f_hat is None else f_hat + q
        if f_hat is None:
            raise ValueError("all scales were dropped (indices all -1)")
        return f_hat


# ---------------------------------------------------------------------------------- binary (ELM BAE)
def subtoken_bit_table(code_dim: int, device=None) -> Tensor:
    """(2^code_dim, code_dim) float table: row i holds the bits of i, most significant bit first."""
    if not 1 <= code_dim <= 24:
        raise ValueError(f"code_dim must be in [1, 24], got {code_dim}")
    ids = torch.arange(2**code_dim, device=device)
    shifts = torch.arange(code_dim - 1, -1, -1, device=device)  # MSB first
    return ((ids[:, None] >> shifts[None]) & 1).float()


def bits_to_subtokens(bits: Tensor, token_each: int, code_dim: int) -> Tensor:
    """Pack bits (..., K) with K = token_each * code_dim into sub-token ids (..., token_each).

    Chunk j holds bits [j*code_dim, (j+1)*code_dim); id = sum_i b_i 2^(code_dim - 1 - i) (MSB first).
    """
    K = bits.shape[-1]
    if K != token_each * code_dim:
        raise ValueError(f"bits have {K} channels but token_each * code_dim = {token_each} * {code_dim}")
    b = bits.round().long().reshape(*bits.shape[:-1], token_each, code_dim)  # (..., t, c)
    weights = 2 ** torch.arange(code_dim - 1, -1, -1, device=bits.device)  # (c,) MSB first
    return (b * weights).sum(-1)  # (..., t)


def subtokens_to_bits(subtokens: Tensor, code_dim: int) -> Tensor:
    """Inverse of :func:`bits_to_subtokens`: ids (..., token_each) -> float bits (..., token_each*code_dim)."""
    if subtokens.numel() and (int(subtokens.min()) < 0 or int(subtokens.max()) >= 2**code_dim):
        raise ValueError(f"sub-token ids must be in [0, {2**code_dim})")
    shifts = torch.arange(code_dim - 1, -1, -1, device=subtokens.device)
    bits = (subtokens.long()[..., None] >> shifts) & 1  # (..., t, c)
    return bits.reshape(*subtokens.shape[:-1], -1).float()


class BinaryQuantizer(nn.Module):
    """ELM's binary quantizer on bit logits (the 1x1 projection to K bits lives in the model).

    Args:
        num_bits: K channels of the input logits.
        deterministic: b = 1[p > 0.5]; otherwise Bernoulli(p) in ``train()`` mode. In ``eval()`` the
            bits are always thresholded so tokenization is reproducible (``stochastic_eval`` restores
            ELM's sampled bits, which its AR training uses as augmentation).
        code_weight: weight of the bit-confidence loss mean(p (1 - p)) (0.0 in ELM's defaults).

    Input logits (B, K, *spatial). Output quantized: straight-through bits b + p - sg(p) in {0, 1},
    indices: LongTensor bits (B, K, *spatial), loss: code_weight * mean(p (1 - p)).
    """

    def __init__(self, num_bits: int, deterministic: bool = False, code_weight: float = 0.0,
                 stochastic_eval: bool = False) -> None:
        super().__init__()
        self.num_bits, self.deterministic = num_bits, deterministic
        self.code_weight, self.stochastic_eval = code_weight, stochastic_eval

    def forward(self, logits: Tensor) -> QuantizerOutput:
        if logits.ndim < 2 or logits.shape[1] != self.num_bits:
            raise ValueError(f"BinaryQuantizer expects (B, {self.num_bits}, ...) logits, got {tuple(logits.shape)}")
        in_dtype = logits.dtype
        with _fp32_off_autocast(logits.device.type):
            p = torch.sigmoid(logits.float())
            sample = not self.deterministic and (self.training or self.stochastic_eval)
            with torch.no_grad():
                b = torch.bernoulli(p) if sample else (p > 0.5).float()
            b_st = b + p - p.detach()  # straight-through through the probabilities
            conf = (p * (1 - p)).mean()
            loss = self.code_weight * conf
            # bit entropy: 1.0 when every bit is on half the time (all codes reachable)
            m = b.movedim(1, -1).reshape(-1, self.num_bits).mean(0).clamp(1e-6, 1 - 1e-6)
            h = -(m * m.log2() + (1 - m) * (1 - m).log2()).mean()
            stats = {"bit_confidence": conf.detach(), "bit_entropy": h.detach()}
        return QuantizerOutput(b_st.to(in_dtype), b.long(), loss, stats)
