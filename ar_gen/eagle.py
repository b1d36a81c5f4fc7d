"""EAGLE-style one-layer drafter for a LlamaGen-style image GPT (the drafter LANTERN uses).

Papers: Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"
(arXiv 2401.15077); LANTERN (Jang et al., ICLR 2025, arXiv 2410.03355), drafter
``models/drafters/cnets_llamagen.py`` (facts: ``shared/methods/ar_gen.md`` 3(a), 3(c), 3(g)).

Architecture (per drafter index t, which pairs the target's hidden state h_t at target position t
with the embedding of the token x_{t+1} that followed it)::

    u_t = fc([emb(x_{t+1}); h_t])                    fc: Linear(2C -> C, bias)      (B, T, 2C) -> (B, T, C)
    f_t = Block(u_t)   one Llama decoder layer, *no input RMSNorm* (EAGLE's layer 0), 2D RoPE
    logits_{t+1} = target.head(f_t)                   f_t predicts h_{t+1}; the head predicts x_{t+2}

The token embedding and the output head are the target's (shared, frozen, never stored in the
drafter's checkpoint). The drafter's RoPE index t is the grid index of x_{t+1} (LANTERN builds it
with ``cls_token_num`` one less than the target's: EAGLE's one-position shift).

Training (3(c)): SmoothL1(f_t, h_{t+1}) + 0.1 * soft cross-entropy between the target's next-token
distribution at t+1 and the drafter's, on teacher-forced target hidden states of real token
sequences, with uniform noise on the input hidden states. The condition is dropped to the null
class with the target's label-dropout rate so that the uncond (CFG) stream is in-distribution.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vision.layers import TransformerBlock, precompute_freqs_cis_2d

__all__ = ["EAGLE_PRESETS", "DecodeTables", "EagleConfig", "EagleDrafter", "eagle_config", "load_eagle", "save_eagle"]


@dataclass
class EagleConfig:
    dim: int = 768  # must equal the target's width (shared embedding / head)
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-6  # LANTERN's drafter config uses 1e-6
    rope_base: float = 10000.0
    grid_h: int = 16
    grid_w: int = 16
    vocab_size: int = 16384  # recorded to check the target at load time
    hidden_noise: float = 0.2  # uniform noise amplitude on the input hidden states during training (EAGLE)
    ce_weight: float = 0.1  # LANTERN/EAGLE p_w

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


EAGLE_PRESETS: dict[str, dict[str, Any]] = {
    "eagle-1layer": {},  # one decoder layer of the target's width (fields copied from the target)
}


def eagle_config(target_config: Any, **overrides: Any) -> EagleConfig:
    """Drafter config matching a target ``GPTConfig`` (width, heads, grid, vocabulary)."""
    tc = target_config
    if getattr(tc, "token_each", 1) != 1:
        raise ValueError("the EAGLE drafter supports single-token GPTs (token_each == 1)")
    if getattr(tc, "model_type", "c2i") != "c2i":
        raise ValueError("speculative decoding here supports class-conditional (c2i) targets")
    base = dict(dim=tc.dim, n_head=tc.n_head, n_kv_head=tc.n_kv_head, multiple_of=tc.multiple_of,
                rope_base=tc.rope_base, grid_h=tc.grid_h, grid_w=tc.grid_w, vocab_size=tc.vocab_size)
    known = {f.name for f in fields(EagleConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown EagleConfig field(s) {bad}")
    return EagleConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


class DecodeTables(NamedTuple):
    """What :meth:`EagleDrafter.decode_tables` precomputes for one target: the token half of ``fc``."""

    token: torch.Tensor  # (V, C): W_e emb(x) + b for every code x
    hidden_fc: nn.Linear  # C -> C, no bias: W_h


class EagleDrafter(nn.Module):
    """fc + one decoder layer; ``forward(emb, hidden, positions)`` -> predicted next hidden states."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.config = c = config
        self.fc = nn.Linear(2 * c.dim, c.dim, bias=True)
        self.layer = TransformerBlock(c.dim, c.n_head, c.n_kv_head, multiple_of=c.multiple_of, norm_eps=c.norm_eps)
        self.layer.attention_norm = nn.Identity()  # EAGLE: layer 0 has no input RMSNorm (fc output feeds it)
        freqs = precompute_freqs_cis_2d((c.grid_h, c.grid_w), c.head_dim, c.rope_base, 0)  # (N, D/2, 2)
        self.register_buffer("freqs_cis", freqs, persistent=False)

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """emb, hidden (B, T, C) -> (B, T, C).

        ``positions`` None: full causal forward from drafter index 0 (training / reference). Otherwise
        (B, T) per-row drafter indices with a per-row KV cache installed (``ar_gen.spec_models``), and
        ``mask`` (B, 1, T, kv_len).
        """
        u = self.fc(torch.cat([emb, hidden.to(emb.dtype)], dim=-1))  # (B, T, 2C) -> (B, T, C)
        n_pos = self.freqs_cis.shape[0]
        if positions is None:
            t = u.shape[1]
            return self.layer(u, self.freqs_cis[:t], is_causal=True)
        freqs = self.freqs_cis[positions.clamp(max=n_pos - 1)]  # (B, T, D/2, 2); past-the-end drafts are unused
        return self.layer(u, freqs, positions, mask=mask, kv_len=kv_len)

    @torch.no_grad()
    def decode_tables(self, embedding: torch.Tensor) -> DecodeTables:
        """Decoding fast path: split ``fc`` once per generation.

        fc([e; h]) = (W_e e + b) + W_h h, so with ``token = E W_e^T + b`` (V, C) precomputed for every code
        (E: the target's (V, C) token embedding) a draft step is a row lookup plus a (C -> C) product
        instead of an embedding lookup, a concat and a (2C -> C) product (:meth:`forward_tables`)."""
        c = self.config
        w_tok, w_hid = self.fc.weight[:, : c.dim], self.fc.weight[:, c.dim:]  # (C, C) each
        token = embedding.to(w_tok.dtype) @ w_tok.t()  # (V, C)
        if self.fc.bias is not None:
            token = token + self.fc.bias
        hidden_fc = nn.Linear(c.dim, c.dim, bias=False, device=w_hid.device, dtype=w_hid.dtype)
        hidden_fc.weight.copy_(w_hid)
        return DecodeTables(token.contiguous(), hidden_fc.eval())

    def forward_tables(self, tables: DecodeTables, tokens: torch.Tensor, hidden: torch.Tensor,
                       positions: torch.Tensor, mask: torch.Tensor | None = None,
                       kv_len: int | None = None) -> torch.Tensor:
        """``forward(embed(tokens), hidden, positions, mask, kv_len)`` (equal up to float rounding) with
        ``tables = decode_tables(embedding)``: tokens (B, T) int64, hidden (B, T, C) -> (B, T, C)."""
        u = tables.token[tokens] + tables.hidden_fc(hidden.to(tables.token.dtype))  # (B, T, C)
        n_pos = self.freqs_cis.shape[0]
        freqs = self.freqs_cis[positions.clamp(max=n_pos - 1)]  # (B, T, D/2, 2)
        return self.layer(u, freqs, positions, mask=mask, kv_len=kv_len)

    def loss(self, target: nn.Module, tokens: torch.Tensor, hidden: torch.Tensor, target_logits: torch.Tensor,
             noise_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """EAGLE loss on teacher-forced target states.

        tokens (B, N) image tokens; hidden (B, N, C) target final-norm hidden states at positions 0..N-1
        (h_0 at the class token); target_logits (B, N, V) the target's logits at the same positions.
        Pairs t = 0..N-2: input (emb(x_t) [token at position t+1], h_t) -> predict h_{t+1}, logits_{t+1}.
        """
        c = self.config
        emb = target.embed_tokens(tokens[:, :-1]).detach()  # (B, N-1, C): x_{t+1} for t = 0..N-2
        h_in = hidden[:, :-1]
        if self.training and c.hidden_noise > 0:
            noise = torch.rand(h_in.shape, generator=noise_generator, device=h_in.device, dtype=h_in.dtype)
            h_in = h_in + (2 * noise - 1) * c.hidden_noise
        feat = self(emb, h_in)  # (B, N-1, C)
        h_next = hidden[:, 1:]
        reg = F.smooth_l1_loss(feat.float(), h_next.float())
        logp = torch.log_softmax(target.head(feat), dim=-1)  # (B, N-1, V)
        p_target = torch.softmax(target_logits[:, 1:].float(), dim=-1)
        ce = -(p_target * logp).sum(-1).mean()
        with torch.no_grad():
            acc = (logp.argmax(-1) == target_logits[:, 1:].argmax(-1)).float().mean()
        return {"loss": reg + c.ce_weight * ce, "smooth_l1": reg.detach(), "ce": ce.detach(), "top1_agree": acc}


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def save_eagle(model: EagleDrafter, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` (temp file then rename). Shared target weights are not stored."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith(("k_cache", "v_cache"))}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt", "arch": "ar_gen.eagle.EagleDrafter"})
    os.replace(tmp, out / "model.safetensors")
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({"arch": "ar_gen.eagle.EagleDrafter", "config": asdict(model.config), **(extra or {})}, fh, indent=2)
    os.replace(tmp, out / "config.json")
    return out


def load_eagle(path: str | os.PathLike, map_location: str = "cpu") -> tuple[EagleDrafter, dict[str, Any]]:
    """Load from a ``save_eagle`` directory or a Lightning ``.ckpt`` of ``EagleDrafterModule`` -> (eval model, meta)."""
    from vision.towers import load_state_dict_checked

    p = Path(path)
    if p.is_dir():
        cfg_file, weights = p / "config.json", p / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise ValueError(f"{p}: not an EAGLE drafter directory (needs config.json and model.safetensors)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("arch") != "ar_gen.eagle.EagleDrafter":
            raise ValueError(f"{cfg_file}: not an EAGLE drafter (arch={meta.get('arch')!r})")
        from safetensors.torch import load_file

        state = load_file(str(weights), device=map_location)
    elif p.is_file():
        try:
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{p}: cannot be read with weights_only=True ({err})") from err
        hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        if not isinstance(hp, dict) or "eagle_config" not in hp:
            raise ValueError(f"{p}: not an EAGLE drafter checkpoint (no hyper_parameters['eagle_config'])")
        meta = {"arch": "ar_gen.eagle.EagleDrafter", "config": hp["eagle_config"],
                "target": hp.get("target_ckpt")}
        state = {k[len("drafter."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("drafter.")}
    else:
        raise ValueError(f"drafter checkpoint {p} does not exist")
    model = EagleDrafter(EagleConfig(**meta["config"]))
    load_state_dict_checked(model, state, str(p))
    return model.eval(), meta
