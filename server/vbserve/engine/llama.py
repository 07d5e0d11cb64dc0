"""The engine's own forward of a Llama-family decoder over the slot KV cache (gpt-fast style).

It replaces the Hugging Face eager decoder call for the models it covers (`unsupported`
says why one is not covered; those run the Hugging Face forward). It reads the same weights
as the Hugging Face model, so nothing is loaded twice:

- q, k and v are one matmul, and gate and up another: their weights are concatenated once
  at load, and the original `nn.Linear`s are re-pointed at slices of the fused weight (no
  second copy). Adapters stay per target module: each wrapped layer adds its LoRA delta
  into its slice of the fused output (`MultiAdapterLinear.add_lora_`).
- On the CPU in float32 the matmuls go to oneDNN (`mkldnn._linear_pointwise`, the op
  Inductor emits for CPU linears) instead of MKL's sgemm, which `F.linear` calls: on this
  AMD EPYC the decode-step matmuls took about half the time (36 vs 67 ms for SmolLM2's
  weights at 32 rows, best of 12 on the 2-core machine). bfloat16 `F.linear` is oneDNN
  already.
- Attention is `scaled_dot_product_attention` straight over the cache's rows, without
  Hugging Face's `repeat_kv` copies: the G query heads that share a KV head are laid out
  as G x L queries of that head (N, kv_heads, G * L, head_dim), a view for decode. SDPA's
  own `enable_gqa` is slower on the CPU (decode at 32 rows, 60 keys: 3.6 ms vs 0.31 ms per
  layer in bfloat16, 0.22 vs 0.20 ms in float32; one thread). The boolean mask is
  (N, 1, G * L, kv_len), built once per step: for decode, each row's length, N x kv_len.
- RoPE is Hugging Face's own rotary module (every `rope_scaling` it knows), once per step.
- The LM head runs only at each row's last position; logits come back in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, apply_rotary_pos_emb

from vbserve.vblora.layer import MultiAdapterLinear

from .kv_cache import SlotKVCache

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unsupported(model: PreTrainedModel) -> str | None:
    """Why the fast forward cannot run `model` (None: it can)."""
    cfg = model.config
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if cfg.model_type != "llama" or not layers:
        return f"model type {cfg.model_type!r} (the fast forward covers llama)"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases on the projections"
    if cfg.hidden_act != "silu":
        return f"activation {cfg.hidden_act!r}"
    for layer in layers:
        if type(layer.self_attn) is not LlamaAttention or type(layer.mlp) is not LlamaMLP:
            return "a modified attention or MLP module"
        attn, mlp = layer.self_attn, layer.mlp
        mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(isinstance(m, MultiAdapterLinear) for m in mods):
            return "projections not wrapped for adapters"
    return None


def pick_linear(weight: torch.Tensor) -> Linear:
    """oneDNN for float32 on the CPU (see the module docstring), `F.linear` elsewhere."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        onednn = torch.ops.mkldnn._linear_pointwise
        return lambda x, w: onednn(x, w, None, "none", [None], "")
    return F.linear


def fuse(linears: list[MultiAdapterLinear]) -> torch.Tensor:
    """One weight for several projections of the same input; each projection's own weight
    becomes a view of its rows, so the model holds the weights once."""
    fused = torch.cat([m.base.weight.detach() for m in linears])
    start = 0
    for m in linears:
        end = start + m.base.out_features
        m.base.weight = nn.Parameter(fused[start:end], requires_grad=False)
        start = end
    return fused


class _Block:
    """One decoder layer's weights and its adapter-wrapped projections."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.gate_up = [mlp.gate_proj, mlp.up_proj]
        self.o, self.down = attn.o_proj, mlp.down_proj
        self.qkv_weight = fuse(self.qkv)
        self.gate_up_weight = fuse(self.gate_up)
        self.qkv_sizes = [m.base.out_features for m in self.qkv]
        self.gate_up_sizes = [m.base.out_features for m in self.gate_up]
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalized in float32, cast back, then scaled."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class LlamaForward:
    """Logits at each row's last position, the Hugging Face model's, from one fused pass."""

    def __init__(self, model: PreTrainedModel) -> None:
        decoder = model.get_decoder()
        cfg = model.config
        self.embed = decoder.embed_tokens.weight
        self.final_norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self.rotary = decoder.rotary_emb
        self.lm_head = model.get_output_embeddings().weight
        self.blocks = [_Block(layer) for layer in decoder.layers]
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.linear = pick_linear(self.lm_head)

    def __call__(
        self, cache: SlotKVCache, input_ids: torch.Tensor, positions: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions: (N, L) on the model's device; cache.route() already called.
        returns (N, V) float32 logits at `last_index`."""
        n, length = input_ids.shape
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(hidden, positions)
        kv_len = cache.get_seq_length()
        # Causal over each row's own history: the query at position p sees keys 0..p; the
        # same for each of the G query heads of a KV head (see `_layer`).
        mask = torch.arange(kv_len, device=hidden.device).view(1, 1, 1, kv_len) <= positions.view(n, 1, length, 1)
        group = self.heads // self.kv_heads
        if length > 1 and group > 1:
            mask = mask.expand(n, group, length, kv_len).reshape(n, 1, group * length, kv_len)
        for i, block in enumerate(self.blocks):
            hidden = self._layer(i, block, hidden, cos, sin, mask, cache)
        last = hidden[torch.arange(n, device=hidden.device), last_index]
        return self.linear(rms_norm(last, *self.final_norm), self.lm_head).float()

    def _layer(
        self,
        i: int,
        block: _Block,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: SlotKVCache,
    ) -> torch.Tensor:
        n, length, _ = hidden.shape
        x = rms_norm(hidden, *block.input_norm)
        qkv = self._fused(block.qkv, block.qkv_weight, block.qkv_sizes, x)
        q, k, v = (t.view(n, length, -1, self.head_dim).transpose(1, 2) for t in qkv.split(block.qkv_sizes, dim=-1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = cache.update(k, v, i)
        grouped = q.reshape(n, self.kv_heads, -1, self.head_dim)  # (N, kv_heads, G * L, head_dim)
        attn = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        attn = attn.view(n, self.heads, length, self.head_dim).transpose(1, 2).reshape(n, length, -1)
        hidden = hidden + block.o.add_lora_(self.linear(attn, block.o.base.weight), attn)

        x = rms_norm(hidden, *block.post_norm)
        gate, up = self._fused(block.gate_up, block.gate_up_weight, block.gate_up_sizes, x).split(
            block.gate_up_sizes, dim=-1
        )
        act = F.silu(gate) * up
        return hidden + block.down.add_lora_(self.linear(act, block.down.base.weight), act)

    def _fused(
        self, layers: list[MultiAdapterLinear], weight: torch.Tensor, sizes: list[int], x: torch.Tensor
    ) -> torch.Tensor:
        """x @ weight.T for the fused projections, each projection's adapter delta added to
        its own slice of the output."""
        out = self.linear(x, weight)
        for layer, part in zip(layers, out.split(sizes, dim=-1), strict=True):
            layer.add_lora_(part, x)
        return out
