"""Mirrors modules/sd_hijack_optimizations.py: cross-attention optimisations REPLACE THE CLASS METHOD
ldm.modules.attention.CrossAttention.forward (every instance at once; sd_hijack.apply_optimizations re-applies
them on every model load, weight reload and setting change).

All of them call self.to_q / self.to_k / self.to_v. Note the difference in how the output projection is called:
  * "sdp", "sdp-no-mem" (and sub-quadratic in the WebUI): self.to_out[0](h) then self.to_out[1](h) -- the
    to_out Sequential itself is NOT called, so a forward hook on `attn2.to_out` does not fire, one on
    `attn2.to_out[0]` (or on attn2 itself) does;
  * "InvokeAI", "Doggettx", "V1", xformers and the un-optimised forward: self.to_out(out).
Stand-in deviation: "Automatic" picks sdp (on a CPU the WebUI would pick InvokeAI); xformers/Doggettx/sub-quadratic
are not provided (Doggettx/V1 share the einsum implementation below).
"""
import torch
from einops import rearrange

from modules import shared
from modules.hypernetworks import hypernetwork


def default(val, d):
    return val if val is not None else d


class SdOptimization:
    name: str = None
    label: str = None
    cmd_opt: str = None
    priority: int = 0

    def title(self):
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self):
        return True

    def apply(self):
        pass

    def undo(self):
        import ldm.modules.attention
        ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward


class SdOptimizationSdpNoMem(SdOptimization):
    name = "sdp-no-mem"
    label = "scaled dot product without memory efficient attention"
    cmd_opt = "opt_sdp_no_mem_attention"
    priority = 80

    def is_available(self):
        return hasattr(torch.nn.functional, "scaled_dot_product_attention") and callable(torch.nn.functional.scaled_dot_product_attention)

    def apply(self):
        import ldm.modules.attention
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_no_mem_attention_forward


class SdOptimizationSdp(SdOptimizationSdpNoMem):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 70

    def apply(self):
        import ldm.modules.attention
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward


class SdOptimizationInvokeAI(SdOptimization):
    name = "InvokeAI"
    cmd_opt = "opt_split_attention_invokeai"
    priority = 10

    def apply(self):
        import ldm.modules.attention
        ldm.modules.attention.CrossAttention.forward = split_cross_attention_forward_invokeAI


class SdOptimizationV1(SdOptimizationInvokeAI):
    name = "V1"
    label = "original v1"
    cmd_opt = "opt_split_attention_v1"
    priority = 10


def list_optimizers(res):
    res.extend([SdOptimizationSdpNoMem(), SdOptimizationSdp(), SdOptimizationInvokeAI(), SdOptimizationV1()])


def split_cross_attention_forward_invokeAI(self, x, context=None, mask=None, **kwargs):
    h = self.heads

    q = self.to_q(x)
    context = default(context, x)

    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k = self.to_k(context_k)
    v = self.to_v(context_v)
    del context, context_k, context_v, x

    dtype = q.dtype
    if shared.opts.upcast_attn:
        q, k, v = q.float(), k.float(), v.float()

    k = k * self.scale
    q, k, v = (rearrange(t, 'b n (h d) -> (b h) n d', h=h) for t in (q, k, v))
    s = torch.einsum('b i d, b j d -> b i j', q, k).softmax(dim=-1)
    r = torch.einsum('b i j, b j d -> b i d', s, v)
    r = r.to(dtype)
    return self.to_out(rearrange(r, '(b h) n d -> b n (h d)', h=h))


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch_size, sequence_length, inner_dim = x.shape

    if mask is not None:
        mask = mask.view(batch_size, 1, 1, -1).expand(batch_size, self.heads, 1, mask.shape[-1])

    h = self.heads
    q_in = self.to_q(x)
    context = default(context, x)

    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k_in = self.to_k(context_k)
    v_in = self.to_v(context_v)

    head_dim = inner_dim // h
    q = q_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
    k = k_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
    v = v_in.view(batch_size, -1, h, head_dim).transpose(1, 2)

    del q_in, k_in, v_in

    dtype = q.dtype
    if shared.opts.upcast_attn:
        q, k, v = q.float(), k.float(), v.float()

    # the output of sdp = (batch, num_heads, seq_len, head_dim)
    hidden_states = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, h * head_dim)
    hidden_states = hidden_states.to(dtype)

    # linear proj
    hidden_states = self.to_out[0](hidden_states)
    # dropout
    hidden_states = self.to_out[1](hidden_states)
    return hidden_states


def scaled_dot_product_no_mem_attention_forward(self, x, context=None, mask=None, **kwargs):
    # The WebUI wraps this in torch.backends.cuda.sdp_kernel(enable_mem_efficient=False); irrelevant on a CPU.
    return scaled_dot_product_attention_forward(self, x, context, mask)
