"""Stand-in for the AUTOMATIC1111 stable-diffusion-webui v1.10.1 ``modules`` package (test support only).

Put ``tests/webui_standin`` on ``sys.path`` and ``import modules.scripts`` etc. as an extension does inside the
WebUI. Only what an extension touches is reproduced, with the real names, call signatures and call orders.
Which real file each piece mirrors (paths relative to the WebUI root; ControlNet = sd-webui-controlnet v1.1.455):

  modules/scripts.py                  Script, AlwaysVisible, basedir(), ScriptRunner (hook order, exception swallowing)
  modules/script_loading.py           load_module(), preload_extensions()
  modules/script_callbacks.py         on_* registration, *_callback firing, CFGDenoiserParams & co, clear_callbacks()
  modules/options.py                  OptionInfo, Options (attribute access, .data, add_option, set)
  modules/shared_options.py           (subset of) the built-in option defaults the samplers/processing read
  modules/shared.py, shared_state.py  opts, cmd_opts, state (interrupted/skipped, sampling_step), sd_model
  modules/shared_cmd_options.py       the argparse parser + cmd_opts (extensions add flags in preload.py)
  modules/paths.py                    models_path, script_path, data_path (models_path is settable per test)
  modules/errors.py                   report() prints "*** message" + traceback to stderr (and records it here)
  modules/ui_components.py            InputAccordion (gradio 3.41.2 InputAccordionImpl), FormRow, ToolButton, ...
  modules/api/api.py, api/models.py   decode_base64_to_image, script_name_to_index, init_default_script_args,
                                      init_script_args (the alwayson_scripts handling of /sdapi/v1/txt2img), ScriptInfo
  modules/processing.py               StableDiffusionProcessing(Txt2Img/Img2Img), Processed, process_images, infotext
  modules/prompt_parser.py            ScheduledPromptConditioning, MulticondLearnedConditioning, AND handling,
                                      reconstruct_(multi)cond_batch (prompt editing [a:b:n] is NOT reproduced)
  modules/sd_hijack_clip.py           the 75-token-chunk CLIP wrapper (77, 154, ... tokens), emphasis, comma backtrack
  modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward: the exact row layouts / chunking / skip-uncond rules
  modules/sd_samplers_kdiffusion.py   CompVisDenoiser (k-diffusion), Euler sampler, launch_sampling, interruption
  modules/sd_samplers_common.py       InterruptedException, Sampler.launch_sampling
  modules/sd_hijack_optimizations.py  class-level CrossAttention.forward replacements (sdp, sdp-no-mem, InvokeAI, V1)
  modules/sd_hijack.py                apply_optimizations()/undo_optimizations(), model_hijack
  modules/hypernetworks/hypernetwork.py  attention_CrossAttention_forward (what undo_optimizations installs)
  launch.py (+ modules/launch_utils.py)  is_installed(), run_pip() (recorded, never run)

Deliberate simplifications (none changes what an attn2 layer or a script hook sees): one sampler (Euler) with the
model's own sigma schedule, no prompt editing, no LoRA/textual inversion, a linear stand-in VAE, no image saving, no
cond cache. Anything not listed is absent on purpose: an extension that needs more must say so.
"""
