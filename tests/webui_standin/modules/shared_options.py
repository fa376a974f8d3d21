"""Mirrors (a subset of) modules/shared_options.py: the built-in settings, with the v1.10.1 defaults.

Only options read by this stand-in or commonly read by extensions are present.
"""
import gradio as gr

from modules.options import OptionInfo, options_section


def options_templates():
    """A fresh {key: OptionInfo} dict of the built-in options (fresh objects, so tests cannot leak edits)."""
    templates = {}
    templates.update(options_section(('sd', "Stable Diffusion", "sd"), {
        "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", gr.Dropdown),
        "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", gr.Slider, {"minimum": 1, "maximum": 12, "step": 1}, infotext="Clip skip"),
        "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit", gr.Slider, {"minimum": 0, "maximum": 74, "step": 1}),
        "emphasis": OptionInfo("Original", "Emphasis mode", gr.Radio, {"choices": ["None", "Ignore", "Original", "No norm"]}),
        "sd_vae_encode_method": OptionInfo("Full", "VAE type for encode", gr.Radio, {"choices": ["Full", "TAESD"]}),
        "sd_vae_decode_method": OptionInfo("Full", "VAE type for decode", gr.Radio, {"choices": ["Full", "TAESD"]}),
        "hires_fix_use_firstpass_conds": OptionInfo(False, "For hires fix, calculate conds of second pass using extra networks of first pass."),
        "img2img_fix_steps": OptionInfo(False, "With img2img, do exactly the amount of steps the slider specifies."),
        "initial_noise_multiplier": OptionInfo(1.0, "Noise multiplier for img2img", gr.Slider, {"minimum": 0.0, "maximum": 1.5, "step": 0.001}),
        "inpainting_mask_weight": OptionInfo(1.0, "Inpainting conditioning mask strength", gr.Slider, {"minimum": 0.0, "maximum": 1.0, "step": 0.01}),
        "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
        "tiling": OptionInfo(False, "Tiling"),
        "face_restoration": OptionInfo(False, "Restore faces"),
        "face_restoration_model": OptionInfo("CodeFormer", "Face restoration model"),
    }))
    templates.update(options_section(('optimizations', "Optimizations", "sd"), {
        "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization", gr.Dropdown, {"choices": ["Automatic", "sdp", "sdp-no-mem", "InvokeAI", "V1", "None"]}),
        "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma", gr.Slider, {"minimum": 0.0, "maximum": 15.0, "step": 0.01}, infotext='NGMS'),
        "s_min_uncond_all": OptionInfo(False, "Negative Guidance minimum sigma all steps", infotext='NGMS all steps'),
        "token_merging_ratio": OptionInfo(0.0, "Token merging ratio", gr.Slider, {"minimum": 0.0, "maximum": 0.9, "step": 0.1}),
        "token_merging_ratio_hr": OptionInfo(0.0, "Token merging ratio for high-res pass", gr.Slider, {"minimum": 0.0, "maximum": 0.9, "step": 0.1}),
        "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt", infotext='Pad conds'),
        "pad_cond_uncond_v0": OptionInfo(False, "Pad prompt/negative prompt (v0)", infotext='Pad conds v0'),
        "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
        "fp8_storage": OptionInfo("Disable", "FP8 weight"),
        "upcast_attn": OptionInfo(False, "Upcast cross attention layer to float32"),
    }))
    templates.update(options_section(('sampler-params', "Sampler parameters", "sd"), {
        "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta", gr.Number),
        "s_churn": OptionInfo(0.0, "sigma churn"),
        "s_tmin": OptionInfo(0.0, "sigma tmin"),
        "s_tmax": OptionInfo(0.0, "sigma tmax"),
        "s_noise": OptionInfo(1.0, "sigma noise"),
        "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling", gr.Slider, {"minimum": 0.0, "maximum": 1.0, "step": 0.01}, infotext="Skip Early CFG"),
        "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines"),
        "enable_quantization": OptionInfo(False, "Enable quantization in K samplers"),
        "randn_source": OptionInfo("GPU", "Random number generator source."),
    }))
    templates.update(options_section(('infotext', "Infotext", "ui"), {
        "enable_pnginfo": OptionInfo(True, "Write infotext to metadata of the generated image"),
        "add_model_name_to_info": OptionInfo(True, "Add model name to infotext"),
        "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
        "add_vae_name_to_info": OptionInfo(True, "Add VAE name to infotext"),
        "add_vae_hash_to_info": OptionInfo(True, "Add VAE hash to infotext"),
        "add_user_name_to_info": OptionInfo(False, "Add user name to infotext when authenticated"),
        "add_version_to_infotext": OptionInfo(True, "Add program version to infotext"),
    }))
    templates.update(options_section(('saving-images', "Saving images/grids", "saving"), {
        "samples_save": OptionInfo(True, "Always save all generated images"),
        "samples_format": OptionInfo('png', 'File format for images'),
        "grid_save": OptionInfo(True, "Always save all generated image grids"),
        "return_grid": OptionInfo(True, "Show grid in gallery"),
        "grid_only_if_multiple": OptionInfo(True, "Do not save grids consisting of one picture"),
        "save_images_before_highres_fix": OptionInfo(False, "Save a copy of image before applying highres fix."),
        "outdir_txt2img_samples": OptionInfo("outputs/txt2img-images", "Output directory for txt2img images"),
        "outdir_img2img_samples": OptionInfo("outputs/img2img-images", "Output directory for img2img images"),
        "outdir_txt2img_grids": OptionInfo("outputs/txt2img-grids", "Output directory for txt2img grids"),
        "outdir_img2img_grids": OptionInfo("outputs/img2img-grids", "Output directory for img2img grids"),
    }))
    templates.update(options_section(('api', "API", "system"), {
        "api_enable_requests": OptionInfo(True, "Allow http:// and https:// URLs for input images in API", restrict_api=True),
        "api_forbid_local_requests": OptionInfo(True, "Forbid URLs to local resources", restrict_api=True),
        "api_useragent": OptionInfo("", "User agent for requests", restrict_api=True),
    }))
    templates.update(options_section(('ui', "Live previews", "ui"), {
        "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
        "live_preview_content": OptionInfo("Prompt", "Live preview subject", gr.Radio, {"choices": ["Combined", "Prompt", "Negative prompt"]}),
    }))
    return templates
