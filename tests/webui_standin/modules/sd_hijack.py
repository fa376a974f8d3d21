"""Mirrors the optimisation part of modules/sd_hijack.py: apply_optimizations() / undo_optimizations() and the
model_hijack object (comments + extra_generation_params written while encoding prompts).

Stand-in addition: restore_ldm_forward() puts back the pristine ldm CrossAttention.forward (saved at import) so one
test cannot leak a class-level patch into the next; the WebUI itself never does this.
"""
import ldm.modules.attention

from modules import errors, script_callbacks, sd_hijack_optimizations, shared
from modules.hypernetworks import hypernetwork

ldm_original_CrossAttention_forward = ldm.modules.attention.CrossAttention.forward

optimizers = []
current_optimizer: sd_hijack_optimizations.SdOptimization = None


def list_optimizers():
    new_optimizers = []
    sd_hijack_optimizations.list_optimizers(new_optimizers)  # the WebUI registers these through the callback below
    new_optimizers += script_callbacks.list_optimizers_callback()
    new_optimizers = [x for x in new_optimizers if x.is_available()]
    new_optimizers = sorted(new_optimizers, key=lambda x: x.priority, reverse=True)
    optimizers.clear()
    optimizers.extend(new_optimizers)


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward


def apply_optimizations(option=None):
    """Undo, then install the optimisation named by `option` or opts.cross_attention_optimization ("Automatic" ->
    sdp here; "None" -> only the undo). Returns the applied optimizer's name ('' for none)."""
    global current_optimizer

    undo_optimizations()

    list_optimizers()

    selection = option or shared.opts.cross_attention_optimization
    if selection == "Automatic" and len(optimizers) > 0:
        matching_optimizer = next(iter([x for x in optimizers if x.name == "sdp"]), optimizers[0])
    else:
        matching_optimizer = next(iter([x for x in optimizers if x.title() == selection or x.name == selection]), None)

    if selection == "None":
        matching_optimizer = None
    elif matching_optimizer is None:
        errors.report(f"Cross attention optimization {selection} not found", exc_info=False)

    current_optimizer = matching_optimizer
    if matching_optimizer is None:
        return ''
    matching_optimizer.apply()
    return current_optimizer.name


def restore_ldm_forward():
    global current_optimizer
    ldm.modules.attention.CrossAttention.forward = ldm_original_CrossAttention_forward
    current_optimizer = None


class EmbeddingDatabase:
    """Textual inversion is not reproduced: no embedding is ever found."""
    def find_embedding_at_position(self, tokens, offset):
        return None, None


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()

    def hijack(self, m):
        self.optimization_method = apply_optimizations()

    def undo_hijack(self, m):
        undo_optimizations()

    def apply_circular(self, enable):
        self.circular_enabled = enable

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
