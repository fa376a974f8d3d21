"""Tiny, randomly initialised stand-ins for the models the WebUI loads, built from the real architectures.

make_tiny_sd_model() returns an object shaped like the WebUI's loaded SD1.x model (ldm LatentDiffusion after
sd_hijack):
  .model.diffusion_model   a REAL ldm.modules.diffusionmodules.openaimodel.UNetModel with the SD1 layout
                           (channel_mult (1,2,4,4), 2 res blocks, attention at ds 1,2,4, depth 1) -> exactly 16
                           CrossAttention attn2 layers at input_blocks 1,2,4,5,7,8, middle_block, output_blocks 3..11;
                           only the widths are tiny (model_channels 32 -> 32/64/128 instead of 320/640/1280)
  .model.conditioning_key  "crossattn";  .apply_model(x, t, cond) as ldm's LatentDiffusion
  .cond_stage_model        the WebUI wrapper (modules.sd_hijack_clip) around .wrapped.transformer (a tiny random HF
                           CLIP text model, hidden size = context_dim, with the transformers-4.30 `.text_model` layout)
                           and .wrapped.tokenizer (the REAL CLIP BPE tokenizer, built offline from open_clip's file)
  .get_learned_conditioning(prompts) -> (B, 77 * chunks, context_dim)
  .is_sd1 / .is_sd2 / .is_sdxl, .sd_checkpoint_info (name_for_extra, shorthash, title), .sd_model_hash,
  .sd_model_checkpoint, .alphas_cumprod (the SD scaled-linear schedule), .cond_stage_model_empty_prompt
  .encode_first_stage / .decode_first_stage / .get_first_stage_encoding with a linear stand-in VAE (8x down/up).
The zero-initialised output convolutions of ldm (ResBlock out, SpatialTransformer proj_out, UNet out) are given
default random init, otherwise attention could not influence the output.

make_tiny_sd2_model(): SD2 flags and layout (linear proj_in/out, head channels, pad token 0), context 64.
make_tiny_sdxl_model(): SDXL flags and dict conditioning {"crossattn", "vector"}; SDXL's 11 transformer blocks
(input_blocks 4,5,7,8, middle, output_blocks 0..5) but depth 1 -> 11 attn2, not SDXL's 70 (ldm's SpatialTransformer
cannot run depth > 1 with one context); the vector is not fed to the UNet.
Both exist for error-path tests; they sample, but only SD1 is a faithful layout.
"""
import contextlib
import functools
import gzip
import json
import os
import tempfile

import torch
from torch import nn

from modules import paths, sd_hijack_clip, sd_models
from modules.sd_hijack import model_hijack

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def bytes_to_unicode():
    """CLIP's reversible byte -> printable-unicode map (the first 256 vocabulary entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path():
    import open_clip.tokenizer
    return open_clip.tokenizer.default_bpe()


def clip_tokenizer_dir(cache_dir=None):
    """Writes vocab.json + merges.txt of the CLIP tokenizer (as openai/clip-vit-large-patch14 ships them) from
    open_clip's packaged bpe_simple_vocab_16e6.txt.gz into `cache_dir` (default: a folder in the tmp dir) and returns
    the folder. Vocabulary order, as CLIP defines it: 256 byte chars, the same + '</w>', the 48894 merges, then
    <|startoftext|> (49406) and <|endoftext|> (49407). Files are written atomically (tests may run concurrently)."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "webui_standin_clip_tokenizer")
    vocab_path = os.path.join(cache_dir, "vocab.json")
    merges_path = os.path.join(cache_dir, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        return cache_dir

    with gzip.open(clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a header
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{clip_bpe_path()}: built a CLIP vocabulary of {len(vocab)} entries, expected {CLIP_VOCAB_SIZE}")

    os.makedirs(cache_dir, exist_ok=True)
    for path, text in ((vocab_path, json.dumps({token: i for i, token in enumerate(vocab)})),
                       (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")):
        tmp_path = f"{path}.{os.getpid()}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_path, path)
    return cache_dir


@functools.lru_cache(maxsize=None)
def load_clip_tokenizer():
    """The real CLIP tokenizer (transformers.CLIPTokenizer) without any download."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=CLIP_MAX_LENGTH)


class CLIPTextModelWebUILayout(nn.Module):
    """transformers>=5 flattened CLIPTextModel; the WebUI (transformers 4.30) reads `.text_model.final_layer_norm`
    and its state-dict keys start with "text_model.". This keeps that layout around the new class."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPTextModel
        self.config = config
        self.text_model = CLIPTextModel(config)

    def forward(self, input_ids=None, output_hidden_states=None, **kwargs):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states, **kwargs)


def make_clip_text_model(hidden_size, num_layers=2, num_heads=2):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=hidden_size,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(config)
    if not hasattr(model, "text_model"):
        model = CLIPTextModelWebUILayout(config)
    return model.eval()


class FrozenCLIPEmbedder(nn.Module):
    """Attributes of ldm.modules.encoders.modules.FrozenCLIPEmbedder (what the WebUI wrapper wraps)."""

    def __init__(self, tokenizer, transformer, max_length=CLIP_MAX_LENGTH, layer="last"):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.device = "cpu"
        self.max_length = max_length
        self.layer = layer


class DiffusionWrapper(nn.Module):
    """ldm.models.diffusion.ddpm.DiffusionWrapper ('crossattn'), or sgm's OpenAIWrapper for the dict (SDXL) case."""

    def __init__(self, diffusion_model, conditioning_key="crossattn", dict_cond=False):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key
        self.dict_cond = dict_cond

    def forward(self, x, t, c_concat: list = None, c_crossattn: list = None, c_adm=None, **kwargs):
        if self.dict_cond:  # OpenAIWrapper.forward(x, t, c): the dict arrives as the third argument
            c = c_concat
            return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"))
        if self.conditioning_key != "crossattn":
            raise NotImplementedError(f"conditioning_key {self.conditioning_key!r} is not reproduced")
        cc = torch.cat(c_crossattn, 1)
        return self.diffusion_model(x, t, context=cc)


class TinyFirstStage(nn.Module):
    """A linear stand-in VAE: 8x8 average pooling + a fixed 3->4 channel mix; decode is its pseudo-inverse."""

    def __init__(self):
        super().__init__()
        mix = torch.tensor([[0.4, 0.4, 0.2], [0.5, -0.5, 0.0], [0.0, 0.5, -0.5], [0.3, 0.3, -0.6]])
        self.register_buffer("mix", mix)
        self.register_buffer("unmix", torch.linalg.pinv(mix))

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8)."""
        return torch.einsum("oc,bchw->bohw", self.mix, torch.nn.functional.avg_pool2d(x, 8))

    def decode(self, z):
        """z (B, 4, h, w) -> (B, 3, 8h, 8w), roughly [-1, 1]."""
        return torch.nn.functional.interpolate(torch.einsum("co,bohw->bchw", self.unmix, z), scale_factor=8, mode="nearest")


def sd_alphas_cumprod(linear_start=0.00085, linear_end=0.0120, timesteps=1000):
    """The SD 'scaled linear' beta schedule's cumulative alphas (ldm make_beta_schedule('linear'))."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class TinyLatentDiffusion(nn.Module):
    """What p.sd_model / shared.sd_model looks like to an extension (ldm LatentDiffusion after the WebUI loaded it)."""

    def __init__(self, unet, cond_stage_model, *, name, is_sd1=False, is_sd2=False, is_sdxl=False):
        super().__init__()
        self.model = DiffusionWrapper(unet, "crossattn", dict_cond=is_sdxl)
        self.cond_stage_model = cond_stage_model
        self.first_stage_model = TinyFirstStage()
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())
        self.num_timesteps = 1000
        self.scale_factor = 0.18215
        self.cond_stage_key = "txt"
        self.parameterization = "eps"
        self.latent_channels = 4
        self.is_sd1, self.is_sd2, self.is_sdxl = is_sd1, is_sd2, is_sdxl
        self.is_sd3 = self.is_ssd = self.is_sdxl_inpaint = False
        if is_sdxl:
            self.conditioner = cond_stage_model
        self.sd_checkpoint_info = sd_models.CheckpointInfo(os.path.join(paths.models_path, "Stable-diffusion", f"{name}.safetensors"))
        self.sd_model_hash = self.sd_checkpoint_info.calculate_shorthash()
        self.sd_model_checkpoint = self.sd_checkpoint_info.filename
        self.cond_stage_model_empty_prompt = None

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield None

    def get_learned_conditioning(self, c):
        cond = self.cond_stage_model(c)
        if self.is_sdxl:
            return {"crossattn": cond, "vector": cond.new_zeros(cond.shape[0], 2816)}
        return cond

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if self.is_sdxl:
            return self.model(x_noisy, t, cond)
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            cond = {'c_crossattn': cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return self.first_stage_model.decode(1. / self.scale_factor * z)


def _give_zero_modules_random_init(unet):
    """ldm zero-initialises the last conv of every ResBlock, SpatialTransformer.proj_out and the UNet's out conv;
    re-initialise them (default PyTorch init) so that every layer, attn2 included, influences the output."""
    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.detach().any():
            module.reset_parameters()


def _build(unet_kwargs, *, context_dim, clip_layers, seed, name, wrapper_class, **flags):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, num_res_blocks=2, use_spatial_transformer=True,
                         context_dim=context_dim, use_checkpoint=False, legacy=False, **unet_kwargs)
        _give_zero_modules_random_init(unet)
        transformer = make_clip_text_model(context_dim, num_layers=clip_layers)
    unet.eval()
    wrapped = FrozenCLIPEmbedder(load_clip_tokenizer(), transformer)
    cond_stage_model = wrapper_class(wrapped, model_hijack)
    model = TinyLatentDiffusion(unet, cond_stage_model, name=name, **flags).eval()
    with torch.no_grad():
        empty = model.get_learned_conditioning([""])
    model.cond_stage_model_empty_prompt = empty["crossattn"] if isinstance(empty, dict) else empty
    return model


def make_tiny_sd_model(context_dim=32, model_channels=32, num_heads=2, clip_layers=2, seed=0, name="tiny-sd15"):
    """SD1.x layout (16 attn2), tiny widths. model_channels must be a multiple of 32 (GroupNorm(32) in ldm)."""
    unet_kwargs = dict(model_channels=model_channels, attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_heads=num_heads, transformer_depth=1)
    return _build(unet_kwargs, context_dim=context_dim, clip_layers=clip_layers, seed=seed, name=name,
                  wrapper_class=sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords, is_sd1=True)


def make_tiny_sd2_model(context_dim=64, model_channels=32, num_head_channels=16, clip_layers=2, seed=0, name="tiny-sd21"):
    unet_kwargs = dict(model_channels=model_channels, attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_head_channels=num_head_channels,
                       transformer_depth=1, use_linear_in_transformer=True)
    return _build(unet_kwargs, context_dim=context_dim, clip_layers=clip_layers, seed=seed, name=name,
                  wrapper_class=sd_hijack_clip.FrozenOpenCLIPEmbedderWithCustomWordsLike, is_sd2=True)


def make_tiny_sdxl_model(context_dim=64, model_channels=32, num_head_channels=16, clip_layers=2, seed=0, name="tiny-sdxl"):
    unet_kwargs = dict(model_channels=model_channels, attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_head_channels=num_head_channels,
                       transformer_depth=1, use_linear_in_transformer=True)
    return _build(unet_kwargs, context_dim=context_dim, clip_layers=clip_layers, seed=seed, name=name,
                  wrapper_class=sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords, is_sdxl=True)


def attn2_layer_names(unet):
    """Names of the UNet's cross-attention layers in the WebUI/ControlNet order: input blocks, middle, output blocks."""
    return [name for name, _ in unet.named_modules() if name.endswith(".attn2")]
