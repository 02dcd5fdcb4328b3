"""A plain float64 numpy re-statement of the authors' models (the paper's equations and the released code), written from the
Hugging Face tensor names and config, with loops where the real code is batched. The ground truth for tests."""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def ffn(x, up, down):  # torch Linear weights: [out, in]
    return gelu(x @ up.T) @ down.T


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rope(x, rotary_dim, theta):  # x [T, H, K]; rotate_half on the first rotary_dim dims
    T = x.shape[0]
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = np.arange(T)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)[:, None, :]
    r, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rot = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    return np.concatenate([r * np.cos(ang) + rot * np.sin(ang), keep], axis=-1)


def forward(hf: dict, w: dict, ids, *, top_k: int = 2, rotary_fraction: float = 1.0):
    """Logits [B, T, V] for ids [B, T]. `hf` is config.json; `w` maps HF names to arrays."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    arch = hf["architectures"][0]
    L, d, H = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    K, eps, theta = d // H, hf.get("rms_norm_eps", 1e-6), hf.get("rope_theta", 10000.0)
    rot = int(K * rotary_fraction) // 2 * 2
    out = []
    for seq in np.asarray(ids):
        T = len(seq)
        x0 = w["model.embed_tokens.weight"][seq]
        h = x0.copy()
        table = None
        if "model.moe_table.weight" in w:
            table = w["model.moe_table.weight"][seq].reshape(T, L, -1, d)
        for i in range(L):
            p = f"model.layers.{i}."
            a = rms_norm(h, w[p + "input_layernorm.weight"], eps)
            q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, K), rot, theta)
            k = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(T, H, K), rot, theta)
            v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(T, H, K)
            att = np.zeros((T, H, K))
            for hh in range(H):
                s = q[:, hh] @ k[:, hh].T / math.sqrt(K)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                att[:, hh] = softmax(s) @ v[:, hh]
            h = h + att.reshape(T, d) @ w[p + "self_attn.o_proj.weight"].T
            u = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            if arch == "DenseForCausalLM":
                h = h + ffn(u, w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
            elif arch == "MoeForCausalLM":
                logits = u @ w[p + "router.weight"].T
                f = np.zeros_like(u)
                for t in range(T):  # top-k, softmax over the chosen k, loop over tokens
                    chosen = np.argsort(-logits[t], kind="stable")[:top_k]
                    g = softmax(logits[t, chosen])
                    for gj, j in zip(g, chosen):
                        f[t] += gj * ffn(u[t], w[p + f"experts.{j}.up_proj.weight"],
                                         w[p + f"experts.{j}.down_proj.weight"])
                h = h + f
            else:  # MoLE
                g = softmax(u @ w[p + "router.weight"].T)
                f = ffn(u, w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
                n_exp = g.shape[-1]
                for j in range(n_exp):
                    if table is not None:
                        y = table[:, i, j]
                    else:
                        e = rms_norm(x0, w[p + "expert_layernorm.weight"], eps)
                        y = ffn(e, w[p + f"experts.{j}.up_proj.weight"], w[p + f"experts.{j}.down_proj.weight"])
                    f = f + g[:, j:j + 1] * y
                h = h + f
        h = rms_norm(h, w["model.norm.weight"], eps)
        out.append(h @ w["lm_head.weight"].T)
    return np.stack(out)


def lut_table(hf: dict, w: dict) -> np.ndarray:
    """The authors' reparameterize.py: every expert on every embedding row, [V, L, N, d]."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    L, eps = hf["num_hidden_layers"], hf.get("rms_norm_eps", 1e-6)
    E = w["model.embed_tokens.weight"]
    layers = []
    for i in range(L):
        p = f"model.layers.{i}."
        e = rms_norm(E, w[p + "expert_layernorm.weight"], eps)
        layers.append(np.stack([ffn(e, w[p + f"experts.{j}.up_proj.weight"], w[p + f"experts.{j}.down_proj.weight"])
                                for j in range(hf["num_experts"])], axis=1))
    return np.stack(layers, axis=1)
